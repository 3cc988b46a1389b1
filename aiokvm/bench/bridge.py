"""Forwarding decisions per second of the bridge model, beside a bare dict lookup.

For 64-byte frames on bridges of 4, 16 and 64 ports, in one run:

- ``known-unicast``: the destination is in the FDB (one egress port);
- ``flood``: unknown unicast, flooded to every other port;
- ``vlan-known``: known unicast with VLAN filtering (tag in, tag out);
- ``dict``: the floor, a loop doing only ``fdb.get((dst, vid))`` on the same keys.

It reports decisions per second (median of ``--repeat`` runs) and the ratio
to the dict loop; it asserts nothing.

    aiokvm bench bridge [--frames 200000] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from aiokvm.net import Bridge
from aiokvm.net.frames import push_tag

from .plot import add_output_options, by_benchmark, parse_with_outputs
from .progress import Steps


def mac(i: int) -> bytes:
    return bytes([0x02, 0, 0, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF])


def frame(dst: bytes, src: bytes) -> bytes:
    return dst + src + b"\x88\xb5" + bytes(50)  # 64 bytes


def build(ports: int, *, vlan: bool) -> tuple[Bridge, list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    br = Bridge("br0", vlan_filtering=vlan, ageing_time=1e9)
    names = [f"p{i}" for i in range(ports)]
    for name in names:
        br.add_port(name)
        if vlan:
            br.vlan_add(name, 10)
    hosts = [mac(i + 1) for i in range(ports)]
    for name, h in zip(names, hosts, strict=True):  # learn one host per port
        f = frame(b"\xff" * 6, h)
        br.receive(name, push_tag(f, 10) if vlan else f, 0.0)
    known = []
    for i, name in enumerate(names):
        f = frame(hosts[(i + 1) % ports], hosts[i])
        known.append((name, push_tag(f, 10) if vlan else f))
    unknown = [(name, frame(mac(0xFFFF00 + i), hosts[i])) for i, name in enumerate(names)]
    return br, known, unknown


def rate(fn, frames: list[tuple[str, bytes]], n: int) -> float:
    count = len(frames)
    start = time.perf_counter()
    for i in range(n):
        port, data = frames[i % count]
        fn(port, data, 1.0)
    return n / (time.perf_counter() - start)


def dict_rate(frames: list[tuple[str, bytes]], n: int) -> float:
    fdb = {(data[0:6], 0): port for port, data in frames}
    count = len(frames)
    get = fdb.get
    start = time.perf_counter()
    for i in range(n):
        _port, data = frames[i % count]
        get((data[0:6], 0))
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="aiokvm bench bridge", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    add_output_options(parser)
    args = parse_with_outputs(parser, argv)

    rows = []
    with Steps(3, "bridge") as steps:
        for ports in (4, 16, 64):
            br, known, unknown = build(ports, vlan=False)
            vbr, vknown, _ = build(ports, vlan=True)
            samples: dict[str, list[float]] = {"dict": [], "known-unicast": [], "flood": [], "vlan-known": []}
            for _ in range(args.repeat):
                samples["dict"].append(dict_rate(known, args.frames))
                samples["known-unicast"].append(rate(br.receive, known, args.frames))
                samples["flood"].append(rate(br.receive, unknown, args.frames // 4))
                samples["vlan-known"].append(rate(vbr.receive, vknown, args.frames))
            floor = statistics.median(samples["dict"])
            for path, values in samples.items():
                median = statistics.median(values)
                rows.append({"ports": ports, "path": path, "decisions_per_s": round(median),
                             "ratio_to_dict": round(median / floor, 4)})
            steps.step(f"{ports} ports")
    print(f"{'ports':>5}  {'path':<15}{'decisions/s':>14}{'x dict':>9}")
    for row in rows:
        print(f"{row['ports']:>5}  {row['path']:<15}{row['decisions_per_s']:>14,}{row['ratio_to_dict']:>9.3f}")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump({"benchmark": "bridge", "frame_bytes": 64, "rows": rows}, fh, indent=2)
    if args.plot:
        by_benchmark("bridge", rows, args.plot)


if __name__ == "__main__":
    main()
