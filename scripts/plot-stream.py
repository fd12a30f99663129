#!/usr/bin/env python3
"""Fig. 8 redrawn from `shoal bench stream --out DIR`: one panel per policy
with the demand the workload asked for, the bandwidth the controller
observed, its forecast (Mbit/s, at full scale) and the capacity of the nodes
allocated and serving (nodes x 100 Mbit/s). Standard library only (no
matplotlib on the test machines): writes an SVG.

Also prints, per run, the SLA-violation seconds the simulator counts
(demand > 0.9 x 100 Mbit/s x nodes serving, per 2 s step), so the live run
and `shoal sim autoscale` are compared on the same measure.

usage: scripts/plot-stream.py DIR OUT.svg [policy ...]
"""
import json
import sys

d, out = sys.argv[1], sys.argv[2]
policies = sys.argv[3:] or ["threshold", "ar", "predictive"]
W, H, PAD = 900, 230, 50
runs = []
for p in policies:
    try:
        runs.append((p, json.load(open(f"{d}/stream-live-{p}.json"))))
    except FileNotFoundError:
        pass
tmax = max(s["t"] for _, r in runs for s in r["series"])
ymax = 650.0
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H * len(runs)}" font-family="sans-serif" font-size="11">']
colors = {"demand_mbit": "#999", "observed_mbit": "#1f77b4", "forecast_mbit": "#ff7f0e", "alloc": "#2ca02c", "serve": "#2ca02c"}
for i, (p, r) in enumerate(runs):
    y0 = i * H
    x = lambda t: PAD + (W - 2 * PAD) * t / tmax
    y = lambda v: y0 + H - 25 - (H - 45) * min(v, ymax) / ymax
    svg.append(f'<text x="{PAD}" y="{y0 + 14}" font-weight="bold">{p}: reallocations {r["summary"]["reallocations"]}, stall listener-s {r["summary"]["stall_listener_seconds"]:.0f}, disconnected {r["summary"]["disconnected"]}</text>')
    svg.append(f'<line x1="{PAD}" y1="{y(0)}" x2="{W - PAD}" y2="{y(0)}" stroke="black"/>')
    svg.append(f'<line x1="{PAD}" y1="{y(0)}" x2="{PAD}" y2="{y(ymax)}" stroke="black"/>')
    for v in range(0, int(ymax) + 1, 100):
        svg.append(f'<text x="{PAD - 30}" y="{y(v) + 4}">{v}</text>')
    for t in range(0, int(tmax) + 1, 300):
        svg.append(f'<text x="{x(t) - 8}" y="{y(0) + 14}">{t}s</text>')
    ser = r["series"]
    for key, dash, width in [("demand_mbit", "", 1), ("observed_mbit", "", 1.2), ("forecast_mbit", "4,3", 1.2)]:
        pts = " ".join(f"{x(s['t']):.1f},{y(s[key]):.1f}" for s in ser if s.get(key) is not None)
        svg.append(f'<polyline fill="none" stroke="{colors[key]}" stroke-width="{width}" stroke-dasharray="{dash}" points="{pts}"/>')
    for key, width in [("allocated", 2.5), ("serving", 1)]:
        pts = " ".join(f"{x(s['t']):.1f},{y(100 * s[key]):.1f}" for s in ser)
        svg.append(f'<polyline fill="none" stroke="#2ca02c" stroke-width="{width}" points="{pts}"/>')
    if i == 0:
        lx = W - PAD - 330
        for j, (lab, c, dash) in enumerate([("demand", "#999", ""), ("observed", "#1f77b4", ""), ("forecast", "#ff7f0e", "4,3"), ("nodes x 100 Mbit/s (thick: allocated, thin: serving)", "#2ca02c", "")]):
            svg.append(f'<line x1="{lx}" y1="{y0 + 30 + 13 * j}" x2="{lx + 20}" y2="{y0 + 30 + 13 * j}" stroke="{c}" stroke-dasharray="{dash}" stroke-width="2"/><text x="{lx + 25}" y="{y0 + 34 + 13 * j}">{lab}</text>')
    # The simulator's SLA measure on the live run.
    viol = 0.0
    for a, b in zip(ser, ser[1:]):
        if a["demand_mbit"] > 0.9 * 100 * a["serving"]:
            viol += b["t"] - a["t"]
    print(f"{p}: sla-violation s (demand > 0.9 C x serving) {viol:.0f}, peak nodes {max(s['allocated'] for s in ser)}")
svg.append("</svg>")
open(out, "w").write("\n".join(svg))
