"""The two faults the demo injects into real agents, and what they measure.

- `crash_and_return`: an agent started with `EDGEWISE_CRASH_AT` SIGKILLs itself at that
  install step; restart it (as an init system would) and record what it serves first:
  the model it boots from its committed, verified slot.
- `cut_uplink`: close the agent's TCP path to the control plane for a while; record the
  inferences it serves meanwhile, the telemetry it buffers, and how long the backfill
  takes once the link is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from edgewise.demo._api import DemoError
from edgewise.demo._proxy import UplinkProxy
from edgewise.demo._stack import AgentProc

__all__ = ["crash_and_return", "cut_uplink"]

Note = Callable[[str], None]


async def crash_and_return(
    agent: AgentProc, pipeline: str, point: str, note: Note
) -> dict[str, Any]:
    """Wait for `agent` to die at `point`, restart it, and return what it served first."""
    assert agent.child is not None
    while agent.child.alive():
        await asyncio.sleep(0.05)
    code = agent.child.proc.returncode
    note(f"agent {agent.name} died at {point} (exit {code}); restarting it")
    t0 = time.monotonic()
    await agent.start()
    first: dict[str, Any] = {}
    while not first:
        p = ((await agent.status()).get("pipelines") or {}).get(pipeline) or {}
        if p.get("serving"):
            first = p
        else:
            await asyncio.sleep(0.05)
    back_s = round(time.monotonic() - t0, 2)
    note(
        f"agent {agent.name} back in {back_s:.1f}s serving {first.get('model')}@"
        f"{first.get('version')} from slot {first.get('slot')}"
    )
    return {"exit_code": code, "back_s": back_s, "first_served": first}


async def cut_uplink(
    agent: AgentProc, proxy: UplinkProxy, pipeline: str, offline_s: float, note: Note
) -> dict[str, Any]:
    """Cut the agent's uplink for `offline_s`, restore it, wait for the backfill.

    Raises:
        DemoError: the buffer did not drain within a minute of reconnecting.
    """
    before = await agent.status()
    served0 = await agent.inferences(pipeline)
    uploaded0 = int(before.get("telemetry_uploaded", 0))
    proxy.cut()
    t0 = time.monotonic()
    await asyncio.sleep(offline_s)
    during = await agent.status()
    served1 = await agent.inferences(pipeline)
    buffered = int(during.get("buffer_depth", 0))
    offline = round(time.monotonic() - t0, 1)
    proxy.restore()
    note(
        f"{agent.name} offline {offline}s: online={during.get('online')}, served "
        f"{served1 - served0} inferences, {buffered} telemetry records buffered"
    )
    t1 = time.monotonic()
    while True:
        st = await agent.status()
        if st.get("online") and int(st.get("buffer_depth", 1)) == 0:
            break
        if time.monotonic() - t1 > 60:
            raise DemoError(f"{agent.name} did not backfill its telemetry within 60s")
        await asyncio.sleep(0.25)
    return {
        "agent": agent.name,
        "offline_s": offline,
        "was_online_while_cut": bool(during.get("online")),
        "served_offline": served1 - served0,
        "version_offline": ((during.get("pipelines") or {}).get(pipeline) or {}).get("version"),
        "buffered": buffered,
        "uploaded_after": int(st.get("telemetry_uploaded", 0)) - uploaded0,
        "backfill_s": round(time.monotonic() - t1, 2),
    }
