"""`Fleet`: N simulated devices in one asyncio process against a real control plane.

Usage::

    async with Fleet("http://127.0.0.1:8080", 1000, seed=7, admin_token=token,
                     labels="hw=cpu-small:0.5,cpu-large:0.5;site=lab,store-1",
                     faults=Faults(flaky=0.02), time_scale=0.05) as fleet:
        ok = await fleet.run_until(lambda f: f.count_running("digits-mlp@1.1.0") == 1000,
                                   timeout=120)
        print(fleet.summary())

Devices share `httpx.AsyncClient`s in shards of `SHARD_DEVICES` (each request is still
signed by its own device); each shard's transport injects the network faults. Shards, not
one client: httpcore's pool looks at every connection it holds on every request (idle
and expiry checks), so one pool for 10,000 devices made each request cost O(fleet) and
the simulator, not the control plane, the limit. Each shard's connections are moved by
`LightTransport` (keep-alive HTTP/1.1 on asyncio) rather than httpcore, for the same
reason. Enrollment runs with bounded concurrency; then each device runs as its own task.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from importlib import metadata
from types import TracebackType
from typing import Any, TypeVar

import httpx

from edgewise.sim._artifacts import ArtifactBook
from edgewise.sim._behaviour import BehaviourBook
from edgewise.sim._cancel import cancel_and_wait
from edgewise.sim._device import SimDevice
from edgewise.sim._env import SimEnv
from edgewise.sim._faults import Faults, FaultyTransport
from edgewise.sim._profile import LabelSpec, parse_labels, plan_fleet
from edgewise.sim._transport import LeanClient, LightTransport

__all__ = ["SHARD_DEVICES", "Fleet", "default_capabilities", "run", "shard_source"]

_T = TypeVar("_T")

SHARD_DEVICES = 16  # devices per HTTP client (connection pool)

if importlib.util.find_spec("sniffio") is None:
    # httpcore asks `import sniffio` on every request and falls back to asyncio when it
    # is missing; a failed import searches sys.path each time (a tenth of the
    # simulator's CPU). A None entry makes the miss immediate; the answer is unchanged.
    sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """`asyncio.run(main)` on uvloop where it is installed (the simulator's event loop).

    A fleet's CPU goes mostly to moving small requests; uvloop's loop and transports,
    written in C over libuv, take less of it than the pure-Python selector loop.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def shard_source(server_url: str, shard: int) -> str | None:
    """The loopback address shard `shard` connects from, for a server on IPv4 loopback.

    Each shard leaves from its own address in 127.0.0.0/8 (from 127.0.16.0 on), so the
    fleet's connections do not crowd one ephemeral port range (see `LightTransport`);
    None (the kernel's choice) for any other server.
    """
    try:
        server = ipaddress.ip_address(httpx.URL(server_url).host)
    except ValueError:
        return None
    if server.version != 4 or not server.is_loopback:
        return None
    return str(ipaddress.IPv4Address("127.0.16.0") + shard % 0xEF0000)


def default_capabilities() -> dict[str, Any]:
    """What a simulated device says it has (a small CPU box on mains power)."""
    try:
        ort = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        ort = "1.0.0"
    return {
        "arch": platform.machine() or "x86_64",
        "cores": 4,
        "memory_mb": 4096,
        "disk_free_mb": 32768,
        "runtimes": {"onnxruntime": ort},
        "execution_providers": ["CPUExecutionProvider"],
        "accelerators": [],
        "thermal_zones": [],
        "power": "mains",
    }


class Fleet:
    """A simulated fleet.

    Args:
        server_url: the control plane.
        n: devices.
        seed: decides labels, offline devices, skews, behaviour draws and faults.
        labels: label spec text (see `parse_labels`) or a parsed spec.
        enroll_token: enrollment token with at least `n` uses; or
        admin_token: an operator token to mint one (devices-write permission).
        faults: what goes wrong.
        behaviours: how model versions behave.
        time_scale: real seconds per simulated second (0.01: 100x faster).
        window_s: telemetry window in simulated seconds (default: the control plane's).
        first_window_s: length of the first window after a model switch (default: a
            fifth of `window_s`).
        inference_rate: inferences per simulated second per pipeline.
        poll_wait_s: long-poll wait (default: the control plane's).
        report_progress: report every install step, not only the outcome.
        enroll_concurrency: enrollments in flight at once.
        capabilities: what devices report (default `default_capabilities()`).
    """

    def __init__(
        self,
        server_url: str,
        n: int,
        seed: int = 0,
        *,
        labels: str | LabelSpec = "",
        enroll_token: str | None = None,
        admin_token: str | None = None,
        faults: Faults | None = None,
        behaviours: BehaviourBook | None = None,
        time_scale: float = 1.0,
        window_s: float | None = None,
        first_window_s: float | None = None,
        inference_rate: float = 2.0,
        poll_wait_s: float | None = None,
        report_progress: bool = True,
        enroll_concurrency: int = 32,
        capabilities: Mapping[str, Any] | None = None,
    ) -> None:
        if n < 0:
            raise ValueError("n must be >= 0")
        if enroll_token is None and admin_token is None:
            raise ValueError("give an enroll_token or an admin_token")
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.server_url = server_url.rstrip("/")
        self.n = n
        self.seed = seed
        self.label_spec: LabelSpec = parse_labels(labels) if isinstance(labels, str) else labels
        self.enroll_token = enroll_token
        self.admin_token = admin_token
        self.faults = faults or Faults()
        self.enroll_concurrency = enroll_concurrency
        self.devices: list[SimDevice] = []
        self._by_id: dict[str, SimDevice] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._started_at: float | None = None
        self._shards: dict[int, httpx.AsyncClient] = {}
        self.transports: list[FaultyTransport] = []
        http = httpx.AsyncClient(base_url=self.server_url, timeout=httpx.Timeout(30.0, pool=None))
        self.env = SimEnv(
            http=http,
            shard=self._shard_client,
            seed=seed,
            book=behaviours or BehaviourBook(),
            faults=self.faults,
            artifacts=ArtifactBook(),
            time_scale=time_scale,
            window_s=window_s,
            first_window_s=first_window_s,
            inference_rate=inference_rate,
            poll_wait_s=poll_wait_s,
            report_progress=report_progress,
            capabilities=dict(capabilities or default_capabilities()),
        )

    def _shard_client(self, index: int) -> httpx.AsyncClient:
        """The client of device `index`'s shard (created on first use)."""
        shard = index // SHARD_DEVICES
        client = self._shards.get(shard)
        if client is None:
            transport = FaultyTransport(
                # Idle connections live 60 s (the server keeps them 75 s), so a device
                # uploading every minute reuses one instead of a TCP handshake each time.
                LightTransport(
                    max_idle=SHARD_DEVICES, idle_s=60.0, source=shard_source(self.server_url, shard)
                ),
                self.faults.flaky,
                self._net_rng,
            )
            self.transports.append(transport)
            # A request's own timeout (the long-poll sets wait + 15 s) overrides this.
            client = LeanClient(self.server_url, transport, httpx.Timeout(30.0, pool=None))
            self._shards[shard] = client
        return client

    def _net_rng(self, request: httpx.Request) -> Any:
        device = self._by_id.get(request.headers.get("x-edgewise-device", ""))
        return device.net_rng if device is not None else None

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Fleet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _mint_token(self, uses: int) -> str:
        r = await self.env.http.post(
            "/api/v1/enroll-tokens",
            json={"labels": {}, "max_uses": max(1, uses), "ttl_s": 86400.0},
            headers={"authorization": f"Bearer {self.admin_token}"},
        )
        if r.status_code != 201:
            raise RuntimeError(f"cannot mint an enrollment token: HTTP {r.status_code} {r.text}")
        return str(r.json()["token"])

    async def start(self) -> None:
        """Enroll every device and start them (idempotent)."""
        if self._started_at is not None:
            return
        self._started_at = time.monotonic()
        await self.add(self.n, _initial=True)

    async def add(self, n: int, *, _initial: bool = False) -> list[SimDevice]:
        """Enroll `n` more devices (the next indexes of the seed) and start them."""
        if n <= 0:
            return []
        if self._started_at is None:
            self._started_at = time.monotonic()
        token = self.enroll_token if self.admin_token is None else await self._mint_token(n)
        assert token is not None
        profiles = plan_fleet(n, self.seed, self.label_spec, self.faults, len(self.devices))
        new = [SimDevice(p, self.env) for p in profiles]
        gate = asyncio.Semaphore(self.enroll_concurrency)

        async def enroll(device: SimDevice) -> None:
            async with gate:
                await device.enroll(token)
            assert device.device_id is not None
            self._by_id[device.device_id] = device
            self._tasks.append(asyncio.create_task(device.run()))

        await asyncio.gather(*(enroll(d) for d in new))
        self.devices.extend(new)
        if not _initial:
            self.n += n
        return new

    async def run_until(
        self, predicate: Callable[[Fleet], bool], timeout: float, interval: float = 0.05
    ) -> bool:
        """Run (starting if needed) until `predicate(self)` holds; False at the timeout."""
        await self.start()
        deadline = time.monotonic() + timeout
        while True:
            self._raise_crashed()
            if predicate(self):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(interval)

    async def run_for(self, seconds: float) -> None:
        """Run (starting if needed) for `seconds` of real time."""
        await self.run_until(lambda _: False, seconds)

    def _raise_crashed(self) -> None:
        # A bug in a device task must fail the run, not leave a silent device.
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError("a simulated device died") from task.exception()

    async def stop(self) -> None:
        """Stop every device and every task it started, then close the connections.

        Install, upload and report tasks are cancelled too: nothing of the fleet runs
        afterwards, so a caller may close its loop or server right away.
        """
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        for device in self.devices:
            await device.halt()
        for client in [*self._shards.values(), self.env.http]:
            await client.aclose()
        self._shards.clear()
        # Closed transports let go of their sockets one loop turn later; a caller that
        # closes its loop right after this must not find them still open.
        for _ in range(3):
            await asyncio.sleep(0)

    # -- views --------------------------------------------------------------------------

    def device(self, device_id: str) -> SimDevice | None:
        """A device by its control-plane id."""
        return self._by_id.get(device_id)

    def count_running(self, ref: str, pipeline: str | None = None) -> int:
        """Devices running `ref` (in `pipeline`, or in any pipeline)."""
        # Called in polling loops over 10,000 devices: compare name and version in place
        # rather than building each device's `running()` map.
        name, _, version = ref.rpartition("@")
        count = 0
        for d in self.devices:
            for p, pipe in d.pipes.items():
                m = pipe.running
                wanted = pipeline is None or p == pipeline
                if wanted and m is not None and m.version == version and m.name == name:
                    count += 1
                    break
        return count

    def count_ever_ran(self, ref: str) -> int:
        """Devices on which `ref` was ever active."""
        return sum(1 for d in self.devices if ref in d.ever_ran)

    def summary(self) -> dict[str, Any]:
        """Counts of the fleet now: versions running, statuses, faults, requests."""
        stats = self.env.stats
        running: Counter[str] = Counter()
        ever: Counter[str] = Counter()
        statuses: Counter[str] = Counter()
        for d in self.devices:
            running.update(d.running().values())
            ever.update(d.ever_ran)
            statuses.update(d.statuses().values())
        elapsed = time.monotonic() - self._started_at if self._started_at is not None else 0.0
        return {
            "devices": len(self.devices),
            "enrolled": sum(1 for d in self.devices if d.device_id is not None),
            "offline": sum(1 for d in self.devices if d.profile.offline),
            "old_agents": sum(1 for d in self.devices if d.profile.old_agent),
            "up": sum(1 for d in self.devices if d.up),
            "running": dict(sorted(running.items())),
            "ever_ran": dict(sorted(ever.items())),
            "statuses": dict(sorted(statuses.items())),
            "installs": stats.installs,
            "install_failures": stats.install_failures,
            "crashes": stats.crashes,
            "downloads": stats.downloads,
            "cut_downloads": stats.cut_downloads,
            "slow_downloads": stats.slow_downloads,
            "bytes_downloaded": stats.bytes_downloaded,
            "telemetry_records": stats.telemetry_records,
            "telemetry_dropped": stats.telemetry_dropped,
            "faults_injected": sum(t.injected for t in self.transports),
            "requests": dict(sorted(stats.requests.items())),
            "errors": dict(sorted(stats.errors.items())),
            "refusals": dict(sorted(stats.refusals.items())),
            "elapsed_s": round(elapsed, 3),
        }
