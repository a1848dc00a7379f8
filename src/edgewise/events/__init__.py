"""The event plane: one `EventBus` interface, in-process or over MQTT (Mosquitto).

Example:
    >>> from edgewise.events import InProcessBus, MqttBus
    >>> bus = InProcessBus()             # or MqttBus("127.0.0.1", 1883)
    >>> sub = bus.subscribe("runtime/#", print)
    >>> bus.publish("runtime/digits/degraded", {"reason": "temperature 90 C"})  # doctest: +SKIP
"""

from edgewise.events._bus import (
    Event,
    EventBus,
    Handler,
    InProcessBus,
    Subscription,
    topic_level,
    topic_matches,
)
from edgewise.events._mqtt import MqttBus

__all__ = [
    "Event",
    "EventBus",
    "Handler",
    "InProcessBus",
    "MqttBus",
    "Subscription",
    "topic_level",
    "topic_matches",
]
