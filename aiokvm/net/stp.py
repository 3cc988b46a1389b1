"""IEEE 802.1D-1998 spanning tree as Linux's bridge runs it, as pure logic.

The behaviour follows ``net/bridge/br_stp.c``, ``br_stp_bpdu.c``,
``br_stp_timer.c`` and ``br_stp_if.c``; nothing here does I/O or reads a
clock.  Every call that can change state takes ``now`` (seconds, any float
epoch, never decreasing) and returns the frames to transmit as
``[(port name, 60-byte frame)]``, each sent from that port's own MAC to
01:80:C2:00:00:00.  ``tick(now)`` runs every timer that expired by ``now``;
the other calls run overdue timers first, so a caller that ticks coarsely
still sees events in the kernel's order.

Model (the kernel's, in brief):

* Bridge id: 16-bit priority above the 48-bit MAC; port id:
  ``priority << 10 | port_no`` (priority 0-63, port 1-1023).  Lower wins;
  64-bit ids compare as integers, which is the kernel's ``memcmp`` order.
* Each enabled port records the best configuration it heard (designated
  root, cost, bridge, port), or our own when it is designated.  The root
  port is the non-designated port with the best
  ``(root, cost + port cost, designated bridge, designated port, port id)``
  whose root is better than us; a port is designated where our vector beats
  the recorded one.
* Root and designated ports go blocking -> listening -> learning ->
  forwarding, one ``forward_delay`` per step; the others block.  A port
  reaching forwarding while we are designated somewhere, or leaving
  forwarding/learning for blocking, is a topology change.
* The root sends configuration BPDUs on its designated ports every
  ``hello_time``; others relay on their designated ports whenever a
  superseding one arrives on their root port, with message age = time since
  the root sent it + one 1/256 s tick.  A designated port answers inferior
  information at once.  At most one configuration BPDU per port per
  ``HOLD_TIME`` (1 s): a later one is held and sent when the hold ends.
* Recorded information expires ``max_age - message_age`` after it arrived;
  the port then becomes designated and roles are chosen again (a bridge
  left without a root port becomes root).  Worse information from the same
  designated bridge does not supersede, so a lost root is noticed through
  this timer, as in 802.1D-1998.
* Topology change: a non-root bridge sends a TCN on its root port every
  ``hello_time`` (its own) until a configuration with TCA arrives there; a
  designated port receiving a TCN acknowledges (TCA in its next
  configuration) and the bridge notifies toward the root in turn.  The root
  sets TC in its configurations for its own ``max_age + forward_delay``;
  the others copy TC from what their root port hears (``topology_change``),
  during which the FDB should age in ``forward_delay``.
* A non-root bridge runs on the root's times (max age, hello, forward
  delay) as carried in the BPDUs its root port hears.
* A port whose link is down is disabled: no BPDUs in or out, no role.

Choices where the kernel has no exact answer or where this model departs:

* Received RST BPDUs (802.1w, version >= 2) are processed as configuration
  BPDUs, as 802.1D-2004 asks of a legacy bridge and as this project wants.
  Linux itself drops every BPDU whose protocol version byte is not 0;
  ``Stp(..., accept_rst=False)`` does the same.
* Malformed frames (anything ``frames.parse_bpdu`` refuses) are counted in
  ``errors[port]``; well-formed BPDUs that the kernel also drops (another
  destination MAC, message age above max age, disabled port, STP off,
  version when ``accept_rst`` is False) are counted in
  ``ignored[(port, reason)]``.  ``receive`` never raises on frame contents.
* Timers are exact: no ``round_jiffies`` on the hello or hold timers.  A
  timer's handler runs at its own deadline, so a timer it re-arms (e.g.
  listening -> learning -> forwarding) may expire within the same ``tick``.
  A periodic timer (hello, TCN) more than one period late fires once and
  keeps its phase: the beats missed are skipped, not replayed.
* The hello timer starts with the first call that carries a time (the
  kernel starts it when the bridge device comes up).
* ``set_enabled(False)`` turns the bridge into one without STP at once:
  every enabled port forwards and no BPDU is sent or heard.
  ``set_enabled(True)`` restarts STP as a bridge coming up does: every
  enabled port starts over from blocking.  (The kernel switching from
  kernel STP to none leaves port states where they were.)
* ``tc_events`` counts topology changes detected here plus TC periods
  learned from the root (rising edges of ``topology_change`` that this
  bridge did not start); a caller compares it with a saved value.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

from ..errors import ConfigError
from .frames import (
    FLAG_TC,
    FLAG_TCA,
    STP_MULTICAST,
    ConfigBpdu,
    RstBpdu,
    TcnBpdu,
    build_bpdu,
    format_bridge_id,
    parse_bpdu,
)
from .frames import bridge_id as make_bridge_id

HOLD_TIME = 1.0                   # BR_HOLD_TIME
STP_TICK = 1.0 / 256              # BPDU time unit; also the per-hop message age increment
PORT_BITS = 10                    # BR_PORT_BITS
MAX_PORT_NO = (1 << PORT_BITS) - 1
MAX_PORT_PRIORITY = 0xFFFF >> PORT_BITS
MIN_PATH_COST, MAX_PATH_COST = 1, 65535
HELLO_TIME_RANGE = (1.0, 10.0)
MAX_AGE_RANGE = (6.0, 40.0)
FORWARD_DELAY_RANGE = (2.0, 30.0)

Frames = list[tuple[str, bytes]]


class PortState(StrEnum):
    DISABLED = "disabled"
    BLOCKING = "blocking"
    LISTENING = "listening"
    LEARNING = "learning"
    FORWARDING = "forwarding"


def make_port_id(priority: int, port_no: int) -> int:
    """Linux's port id: the priority's low 6 bits above a 10-bit port number."""
    return (priority << PORT_BITS) | (port_no & MAX_PORT_NO)


@dataclass(eq=False)
class _Port:
    name: str
    port_no: int
    mac: bytes
    priority: int
    path_cost: int
    port_id: int
    state: PortState = PortState.DISABLED
    # What this port believes about its segment: our own values when designated.
    designated_root: int = 0
    designated_cost: int = 0
    designated_bridge: int = 0
    designated_port: int = 0
    designated_age: float = 0.0   # when the root sent the recorded information
    topology_change_ack: bool = False
    config_pending: bool = False
    message_age_timer: float | None = None
    forward_delay_timer: float | None = None
    hold_timer: float | None = None


def _cost_sum(p: _Port) -> int:
    """Root path cost through ``p``, wrapping at 32 bits as the kernel's u32 arithmetic does."""
    return (p.designated_cost + p.path_cost) & 0xFFFF_FFFF


def _check_range(what: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{what} {value} is out of range {low}..{high}")


class Stp:
    """The spanning-tree half of one bridge.  See the module docstring."""

    def __init__(
        self,
        mac: bytes,
        *,
        priority: int = 32768,
        hello_time: float = 2.0,
        max_age: float = 20.0,
        forward_delay: float = 15.0,
        enabled: bool = True,
        accept_rst: bool = True,
    ) -> None:
        mac = bytes(mac)
        if len(mac) != 6:
            raise ConfigError(f"bridge MAC must be 6 bytes, got {len(mac)}")
        _check_range("bridge priority", priority, 0, 0xFFFF)
        _check_range("hello time", hello_time, *HELLO_TIME_RANGE)
        _check_range("max age", max_age, *MAX_AGE_RANGE)
        self._check_forward_delay(forward_delay, enabled)
        self.mac = mac
        self.accept_rst = accept_rst
        self._enabled = enabled
        self.bridge_id = make_bridge_id(priority, mac)
        # Configured times (ours) and operating times (the root's, as heard).
        self.bridge_hello_time = float(hello_time)
        self.bridge_max_age = float(max_age)
        self.bridge_forward_delay = float(forward_delay)
        self.hello_time = self.bridge_hello_time
        self.max_age = self.bridge_max_age
        self.forward_delay = self.bridge_forward_delay
        self.designated_root = self.bridge_id
        self.root_path_cost = 0
        self._root_port: _Port | None = None
        self._topology_change = False
        self.topology_change_detected = False
        self.tc_events = 0
        self.hello_timer: float | None = None
        self.tcn_timer: float | None = None
        self.topology_change_timer: float | None = None
        self._ports: dict[str, _Port] = {}
        self.errors: Counter[str] = Counter()
        self.ignored: Counter[tuple[str, str]] = Counter()
        self._now: float | None = None
        self._out: Frames = []

    # -- public API ----------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def topology_change(self) -> bool:
        return self._topology_change

    @property
    def root_id(self) -> int:
        return self.designated_root

    @property
    def root_port(self) -> str | None:
        return self._root_port.name if self._root_port is not None else None

    def is_root(self) -> bool:
        return self.designated_root == self.bridge_id

    def port_state(self, name: str) -> PortState:
        return self._port(name).state

    def port_names(self) -> list[str]:
        return list(self._ports)

    def add_port(
        self, name: str, port_no: int, *, mac: bytes, priority: int = 32, path_cost: int = 100, now: float,
        enabled: bool = True,
    ) -> Frames:
        """A new port, link up unless ``enabled`` is False (br_add_if + br_stp_enable_port)."""
        if name in self._ports:
            raise ConfigError(f"STP port {name!r} already exists")
        _check_range("port number", port_no, 1, MAX_PORT_NO)
        if any(p.port_no == port_no for p in self._ports.values()):
            raise ConfigError(f"STP port number {port_no} is already in use")
        _check_range("port priority", priority, 0, MAX_PORT_PRIORITY)
        _check_range("path cost", path_cost, MIN_PATH_COST, MAX_PATH_COST)
        mac = bytes(mac)
        if len(mac) != 6:
            raise ConfigError(f"port MAC must be 6 bytes, got {len(mac)}")
        self._advance(now)
        p = _Port(name, port_no, mac, priority, path_cost, make_port_id(priority, port_no))
        self._become_designated_port(p)
        self._ports[name] = p
        if enabled:
            self._enable_port(p)
        return self._take()

    def remove_port(self, name: str, now: float) -> Frames:
        p = self._port(name)
        self._advance(now)
        if p.state != PortState.DISABLED:
            self._disable_port(p)
        del self._ports[name]
        return self._take()

    def set_port_enabled(self, name: str, enabled: bool, now: float) -> Frames:
        """Link (or admin) up/down.  Repeating the current state does nothing."""
        p = self._port(name)
        self._advance(now)
        if enabled and p.state == PortState.DISABLED:
            self._enable_port(p)
        elif not enabled and p.state != PortState.DISABLED:
            self._disable_port(p)
        return self._take()

    def set_port_priority(self, name: str, priority: int, now: float) -> Frames:
        """As br_stp_set_port_priority (no root port reselection, like the kernel)."""
        p = self._port(name)
        _check_range("port priority", priority, 0, MAX_PORT_PRIORITY)
        self._advance(now)
        new_id = make_port_id(priority, p.port_no)
        if self._is_designated(p):
            p.designated_port = new_id
        p.port_id = new_id
        p.priority = priority
        if p.designated_bridge == self.bridge_id and p.port_id < p.designated_port:
            self._become_designated_port(p)
            self._port_state_selection()
        return self._take()

    def set_port_path_cost(self, name: str, cost: int, now: float) -> Frames:
        p = self._port(name)
        _check_range("path cost", cost, MIN_PATH_COST, MAX_PATH_COST)
        self._advance(now)
        p.path_cost = cost
        self._configuration_update()
        self._port_state_selection()
        return self._take()

    def set_bridge_priority(self, priority: int, now: float) -> Frames:
        _check_range("bridge priority", priority, 0, 0xFFFF)
        self._advance(now)
        was_root = self.is_root()
        new_id = make_bridge_id(priority, self.mac)
        for p in self._ports.values():
            if p.state != PortState.DISABLED and self._is_designated(p):
                p.designated_bridge = new_id
        self.bridge_id = new_id
        self._reselect(was_root)
        return self._take()

    def set_timers(
        self, *, hello_time: float | None = None, max_age: float | None = None,
        forward_delay: float | None = None, now: float,
    ) -> Frames:
        """Our own times; they take effect at once if we are root, else when we become root."""
        if hello_time is not None:
            _check_range("hello time", hello_time, *HELLO_TIME_RANGE)
        if max_age is not None:
            _check_range("max age", max_age, *MAX_AGE_RANGE)
        if forward_delay is not None:
            self._check_forward_delay(forward_delay, self._enabled)
        self._advance(now)
        if hello_time is not None:
            self.bridge_hello_time = float(hello_time)
        if max_age is not None:
            self.bridge_max_age = float(max_age)
        if forward_delay is not None:
            self.bridge_forward_delay = float(forward_delay)
        if self.is_root():
            self._use_own_times()
        return self._take()

    def set_enabled(self, enabled: bool, now: float) -> Frames:
        """Turn STP on or off at run time (see the module docstring)."""
        self._advance(now)
        if enabled and not self._enabled:
            self._enabled = True
            low, high = FORWARD_DELAY_RANGE   # as br_stp_start: clamp what was allowed without STP
            self.bridge_forward_delay = min(max(self.bridge_forward_delay, low), high)
            self._restart()
        elif not enabled and self._enabled:
            self._enabled = False
            self._stop()
        return self._take()

    def receive(self, name: str, frame: bytes, now: float) -> Frames:
        """A BPDU frame heard on port ``name``.  Never raises on the frame's contents."""
        self._advance(now)
        p = self._ports.get(name)
        if p is None:   # a frame still in flight for a port just removed
            return self._take()
        try:
            bpdu = parse_bpdu(frame)
        except ValueError:   # FrameError, and whatever else a codec refuses
            self.errors[name] += 1
            return self._take()
        reason = self._drop_reason(p, frame, bpdu)
        if reason:
            self.ignored[(name, reason)] += 1
        elif isinstance(bpdu, TcnBpdu):
            self._received_tcn_bpdu(p)
        else:
            self._received_config_bpdu(p, bpdu)
        return self._take()

    def tick(self, now: float) -> Frames:
        self._advance(now)
        return self._take()

    def next_deadline(self) -> float | None:
        """When the earliest pending timer expires (None if none): the latest time to call ``tick``."""
        due = self._next_timer(math.inf)
        return due[0] if due else None

    def state(self) -> dict:
        ports = {}
        for p in self._ports.values():
            if p.state == PortState.DISABLED:
                role = "disabled"
            elif p is self._root_port:
                role = "root"
            elif self._is_designated(p):
                role = "designated"
            else:
                role = "alternate"
            ports[p.name] = {
                "role": role,
                "state": p.state.value,
                "port_no": p.port_no,
                "port_id": p.port_id,
                "priority": p.priority,
                "path_cost": p.path_cost,
                "designated_root": format_bridge_id(p.designated_root),
                "designated_cost": p.designated_cost,
                "designated_bridge": format_bridge_id(p.designated_bridge),
                "designated_port": p.designated_port,
                "topology_change_ack": p.topology_change_ack,
                "config_pending": p.config_pending,
            }
        return {
            "enabled": self._enabled,
            "bridge_id": format_bridge_id(self.bridge_id),
            "root_id": format_bridge_id(self.designated_root),
            "root_port": self.root_port,
            "root_path_cost": self.root_path_cost,
            "topology_change": self._topology_change,
            "topology_change_detected": self.topology_change_detected,
            "tc_events": self.tc_events,
            "max_age": self.max_age,
            "hello_time": self.hello_time,
            "forward_delay": self.forward_delay,
            "ports": ports,
        }

    # -- plumbing --------------------------------------------------------------------------------
    @staticmethod
    def _check_forward_delay(value: float, enabled: bool) -> None:
        """Linux enforces 2-30 s only while STP runs; without it 0 is fine (and means nothing)."""
        _check_range("forward delay", value, FORWARD_DELAY_RANGE[0] if enabled else 0.0, FORWARD_DELAY_RANGE[1])

    def _port(self, name: str) -> _Port:
        try:
            return self._ports[name]
        except KeyError:
            raise KeyError(f"no STP port named {name!r}") from None

    def _take(self) -> Frames:
        out, self._out = self._out, []
        return out

    def _advance(self, now: float) -> None:
        """Bring the clock to ``now``, running every timer due by then at its own deadline."""
        if self._now is None:
            self._now = now
            if self._enabled:
                self.hello_timer = now + self.hello_time
        now = max(now, self._now)
        while (due := self._next_timer(now)) is not None:
            deadline, handler, port = due
            self._now = max(self._now, deadline)
            if port is None:
                handler(now)
            else:
                handler(port, now)
        self._now = now

    _BRIDGE_TIMERS = ("hello_timer", "tcn_timer", "topology_change_timer")
    _PORT_TIMERS = ("message_age_timer", "forward_delay_timer", "hold_timer")

    def _next_timer(self, limit: float):
        """The earliest armed timer with deadline <= limit, as (deadline, handler, port or None).
        Ties go to bridge timers first, then ports in the order they were added."""
        best = None
        for attr in self._BRIDGE_TIMERS:
            deadline = getattr(self, attr)
            if deadline is not None and deadline <= limit and (best is None or deadline < best[0]):
                best = (deadline, attr, None)
        for p in self._ports.values():
            for attr in self._PORT_TIMERS:
                deadline = getattr(p, attr)
                if deadline is not None and deadline <= limit and (best is None or deadline < best[0]):
                    best = (deadline, attr, p)
        if best is None:
            return None
        deadline, attr, port = best
        return deadline, getattr(self, f"_{attr}_expired"), port

    def _periodic(self, period: float, now: float) -> float:
        """Next deadline of a periodic timer firing at self._now: the first beat after ``now``."""
        period = max(period, STP_TICK)
        missed = math.floor((now - self._now) / period)
        return self._now + (max(missed, 0) + 1) * period

    def _send(self, p: _Port, bpdu) -> None:
        if self._enabled:
            self._out.append((p.name, build_bpdu(bpdu, src=p.mac)))

    def _drop_reason(self, p: _Port, frame: bytes, bpdu) -> str | None:
        if not self._enabled:
            return "stp_off"
        if p.state == PortState.DISABLED:
            return "port_disabled"
        if bytes(frame[:6]) != STP_MULTICAST:
            return "destination"
        if bpdu.version != 0 and not self.accept_rst:
            return "version"
        if not isinstance(bpdu, TcnBpdu) and bpdu.message_age > bpdu.max_age:
            return "message_age"
        return None

    # -- identifiers and comparisons (br_stp.c) ---------------------------------------------------
    def _is_designated(self, p: _Port) -> bool:
        return p.designated_bridge == self.bridge_id and p.designated_port == p.port_id

    def _designated_for_some_port(self) -> bool:
        return any(p.state != PortState.DISABLED and p.designated_bridge == self.bridge_id
                   for p in self._ports.values())

    def _root_candidate(self, p: _Port) -> bool:
        return (p.state != PortState.DISABLED and not self._is_designated(p)
                and p.designated_root < self.bridge_id)

    @staticmethod
    def _root_vector(p: _Port) -> tuple[int, int, int, int, int]:
        return (p.designated_root, _cost_sum(p), p.designated_bridge, p.designated_port, p.port_id)

    def _should_become_designated(self, p: _Port) -> bool:
        if self._is_designated(p) or p.designated_root != self.designated_root:
            return True
        ours = (self.root_path_cost, self.bridge_id)
        theirs = (p.designated_cost, p.designated_bridge)
        if ours != theirs:
            return ours < theirs
        return p.port_id < p.designated_port

    def _supersedes(self, p: _Port, bpdu) -> bool:
        heard = (bpdu.root_id, bpdu.root_path_cost, bpdu.bridge_id)
        recorded = (p.designated_root, p.designated_cost, p.designated_bridge)
        if heard != recorded:
            return heard < recorded
        # Same root, cost and bridge: a refresh from that bridge, or one of our own looped back.
        return bpdu.bridge_id != self.bridge_id or bpdu.port_id <= p.designated_port

    # -- selection and port states ----------------------------------------------------------------
    def _become_designated_port(self, p: _Port) -> None:
        p.designated_root = self.designated_root
        p.designated_cost = self.root_path_cost
        p.designated_bridge = self.bridge_id
        p.designated_port = p.port_id

    def _root_selection(self) -> None:
        candidates = [p for p in self._ports.values() if self._root_candidate(p)]
        rp = min(candidates, key=self._root_vector) if candidates else None
        self._root_port = rp
        if rp is None:
            self.designated_root = self.bridge_id
            self.root_path_cost = 0
        else:
            self.designated_root = rp.designated_root
            self.root_path_cost = _cost_sum(rp)

    def _designated_port_selection(self) -> None:
        for p in self._ports.values():
            if p.state != PortState.DISABLED and self._should_become_designated(p):
                self._become_designated_port(p)

    def _configuration_update(self) -> None:
        self._root_selection()
        self._designated_port_selection()

    def _port_state_selection(self) -> None:
        for p in self._ports.values():
            if p.state == PortState.DISABLED:
                continue
            if p is self._root_port:
                p.config_pending = False
                p.topology_change_ack = False
                self._make_forwarding(p)
            elif self._is_designated(p):
                p.message_age_timer = None
                self._make_forwarding(p)
            else:
                p.config_pending = False
                p.topology_change_ack = False
                self._make_blocking(p)

    def _make_forwarding(self, p: _Port) -> None:
        if p.state != PortState.BLOCKING:
            return
        if not self._enabled or self.forward_delay == 0:
            p.state = PortState.FORWARDING
            p.forward_delay_timer = None
            self._topology_change_detection()
        else:
            p.state = PortState.LISTENING
            p.forward_delay_timer = self._now + self.forward_delay

    def _make_blocking(self, p: _Port) -> None:
        if p.state in (PortState.DISABLED, PortState.BLOCKING):
            return
        if p.state in (PortState.FORWARDING, PortState.LEARNING):
            self._topology_change_detection()
        p.state = PortState.BLOCKING
        p.forward_delay_timer = None

    def _enable_port(self, p: _Port) -> None:
        """br_stp_enable_port: start over as a designated port in blocking."""
        p.port_id = make_port_id(p.priority, p.port_no)
        self._become_designated_port(p)
        p.state = PortState.BLOCKING
        p.topology_change_ack = False
        p.config_pending = False
        p.message_age_timer = p.forward_delay_timer = p.hold_timer = None
        self._port_state_selection()

    def _disable_port(self, p: _Port) -> None:
        was_root = self.is_root()
        self._become_designated_port(p)
        p.state = PortState.DISABLED
        p.topology_change_ack = False
        p.config_pending = False
        p.message_age_timer = p.forward_delay_timer = p.hold_timer = None
        self._reselect(was_root)

    def _use_own_times(self) -> None:
        """Operate with our own timer values (we are, or start as, the root)."""
        self.max_age = self.bridge_max_age
        self.hello_time = self.bridge_hello_time
        self.forward_delay = self.bridge_forward_delay

    def _reselect(self, was_root: bool) -> None:
        """Pick roles and states again after a change; if that made us the root, act as one."""
        self._configuration_update()
        self._port_state_selection()
        if self.is_root() and not was_root:
            self._become_root_bridge()

    def _become_root_bridge(self) -> None:
        self._use_own_times()
        self._topology_change_detection()
        self.tcn_timer = None
        self._config_bpdu_generation()
        if self._enabled:
            self.hello_timer = self._now + self.hello_time

    def _restart(self) -> None:
        """STP switched on: everything starts over as when the bridge comes up."""
        self.designated_root = self.bridge_id
        self.root_path_cost = 0
        self._root_port = None
        self._use_own_times()
        self._topology_change = False
        self.topology_change_detected = False
        self.tcn_timer = self.topology_change_timer = None
        self.hello_timer = self._now + self.hello_time
        for p in self._ports.values():
            if p.state != PortState.DISABLED:
                self._enable_port(p)

    def _stop(self) -> None:
        """STP switched off: every enabled port forwards, no timers run."""
        self._topology_change = False
        self.topology_change_detected = False
        self.hello_timer = self.tcn_timer = self.topology_change_timer = None
        self.designated_root = self.bridge_id
        self.root_path_cost = 0
        self._root_port = None
        for p in self._ports.values():
            p.message_age_timer = p.forward_delay_timer = p.hold_timer = None
            p.topology_change_ack = p.config_pending = False
            self._become_designated_port(p)
            if p.state != PortState.DISABLED:
                p.state = PortState.FORWARDING

    # -- transmission ---------------------------------------------------------------------------------
    def _transmit_config(self, p: _Port) -> None:
        if p.hold_timer is not None:
            p.config_pending = True
            return
        if self.is_root() or self._root_port is None:
            message_age = 0.0
        else:
            # Time since the root sent what our root port holds, in whole ticks, plus one tick.
            elapsed = self._now - self._root_port.designated_age
            message_age = (math.floor(elapsed / STP_TICK + 1e-6) + 1) * STP_TICK
        if message_age >= self.max_age:
            return
        flags = (FLAG_TC if self._topology_change else 0) | (FLAG_TCA if p.topology_change_ack else 0)
        self._send(p, ConfigBpdu(flags, self.designated_root, self.root_path_cost, self.bridge_id, p.port_id,
                                 message_age, self.max_age, self.hello_time, self.forward_delay))
        p.topology_change_ack = False
        p.config_pending = False
        if self._enabled:
            p.hold_timer = self._now + HOLD_TIME

    def _config_bpdu_generation(self) -> None:
        for p in self._ports.values():
            if p.state != PortState.DISABLED and self._is_designated(p):
                self._transmit_config(p)

    def _transmit_tcn(self) -> None:
        if self._root_port is not None:
            self._send(self._root_port, TcnBpdu())

    # -- topology change ---------------------------------------------------------------------------------
    def _set_topology_change(self, value: bool, *, count: bool = True) -> None:
        if value and not self._topology_change and count:
            self.tc_events += 1
        self._topology_change = value

    def _topology_change_detection(self) -> None:
        if not self._enabled:
            return
        self.tc_events += 1
        if self.is_root():
            self._set_topology_change(True, count=False)
            self.topology_change_timer = self._now + self.bridge_forward_delay + self.bridge_max_age
        elif not self.topology_change_detected:
            self._transmit_tcn()
            self.tcn_timer = self._now + self.bridge_hello_time
        self.topology_change_detected = True

    def _topology_change_acknowledged(self) -> None:
        self.topology_change_detected = False
        self.tcn_timer = None

    # -- received BPDUs ------------------------------------------------------------------------------------
    def _received_config_bpdu(self, p: _Port, bpdu: ConfigBpdu | RstBpdu) -> None:
        was_root = self.is_root()
        if self._supersedes(p, bpdu):
            # Record what the designated bridge on this segment says.
            p.designated_root = bpdu.root_id
            p.designated_cost = bpdu.root_path_cost
            p.designated_bridge = bpdu.bridge_id
            p.designated_port = bpdu.port_id
            p.designated_age = self._now - bpdu.message_age
            p.message_age_timer = self._now + (bpdu.max_age - bpdu.message_age)
            self._configuration_update()
            self._port_state_selection()
            if was_root and not self.is_root():
                self.hello_timer = None
                if self.topology_change_detected:
                    self.topology_change_timer = None
                    self._transmit_tcn()
                    self.tcn_timer = self._now + self.bridge_hello_time
            if p is self._root_port:
                self.max_age = bpdu.max_age
                self.hello_time = bpdu.hello_time
                self.forward_delay = bpdu.forward_delay
                self._set_topology_change(bool(bpdu.flags & FLAG_TC))
                self._config_bpdu_generation()
                if bpdu.flags & FLAG_TCA:
                    self._topology_change_acknowledged()
        elif self._is_designated(p):
            # Inferior information on a segment we serve: answer with ours.
            self._transmit_config(p)

    def _received_tcn_bpdu(self, p: _Port) -> None:
        if self._is_designated(p):
            self._topology_change_detection()
            p.topology_change_ack = True
            self._transmit_config(p)

    # -- timer handlers (br_stp_timer.c); self._now is the timer's deadline -------------------------------
    def _hello_timer_expired(self, now: float) -> None:
        self.hello_timer = None
        self._config_bpdu_generation()
        if self._enabled:
            self.hello_timer = self._periodic(self.hello_time, now)

    def _tcn_timer_expired(self, now: float) -> None:
        self.tcn_timer = None
        if not self.is_root():
            self._transmit_tcn()
            self.tcn_timer = self._periodic(self.bridge_hello_time, now)

    def _topology_change_timer_expired(self, now: float) -> None:
        self.topology_change_timer = None
        self.topology_change_detected = False
        self._set_topology_change(False)

    def _message_age_timer_expired(self, p: _Port, now: float) -> None:
        p.message_age_timer = None
        if p.state == PortState.DISABLED:
            return
        was_root = self.is_root()
        self._become_designated_port(p)
        self._reselect(was_root)

    def _forward_delay_timer_expired(self, p: _Port, now: float) -> None:
        p.forward_delay_timer = None
        if p.state == PortState.LISTENING:
            p.state = PortState.LEARNING
            p.forward_delay_timer = self._now + self.forward_delay
        elif p.state == PortState.LEARNING:
            p.state = PortState.FORWARDING
            if self._designated_for_some_port():
                self._topology_change_detection()

    def _hold_timer_expired(self, p: _Port, now: float) -> None:
        p.hold_timer = None
        if p.config_pending:
            self._transmit_config(p)

