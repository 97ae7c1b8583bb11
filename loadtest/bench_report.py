"""Turns loadtest/bench.sh's runs (presenced-load --json reports) into the
BENCHMARKS.md section: each issue-7 target with its measured value, the
target, and met or missed by how much; then each run's details.

Reads BENCH_WORK (runs.tsv and NAME.json), BENCH_QUICK, BENCH_COMMAND,
BENCH_COMMIT, BENCH_MACHINE, BENCH_ELAPSED from the environment; prints
the section on stdout.
"""

import datetime
import json
import os

work = os.environ["BENCH_WORK"]
quick = os.environ.get("BENCH_QUICK") == "1"

runs = []
with open(os.path.join(work, "runs.tsv")) as f:
    for line in f:
        name, nodes, scenario, args, flags = line.rstrip("\n").split("\t")
        with open(os.path.join(work, name + ".json")) as j:
            report = json.load(j)
        runs.append(
            dict(name=name, nodes=int(nodes), scenario=scenario, args=args, flags=flags, r=report)
        )
by_name = {run["name"]: run["r"] for run in runs}


def correct(r):
    if not r.get("checks"):
        return False
    events = sum(r[k][c] for k in ("presence", "room") for c in ("missed", "duplicated", "out_of_order"))
    checks = all(
        c["observers_settled"]
        and c["presence_mismatches"] == 0
        and c["room_mismatches"] == 0
        and c.get("state_mismatches", 0) == 0
        for c in r["checks"]
    )
    fanout = r.get("fanout")
    members = fanout is None or (
        fanout["member"]["missed"] + fanout["member"]["duplicated"] + fanout["member"]["out_of_order"] == 0
        and fanout["snapshot_mismatches"] == 0
        and fanout["members_settled"]
    )
    offline = sum((r.get("offline_checks") or {}).values())
    loss = r.get("nodeloss")
    lost_ok = loss is None or (
        loss["returned_offlines"] == 0
        and loss["returned_lefts"] == 0
        and loss["gone_offlines"] == loss["gone_offlines_expected"]
    )
    cur = r.get("cursors")
    states_ok = cur is None or (
        all(cur[k][c] == 0 for k in ("member", "observer") for c in ("duplicated", "out_of_order", "to_sender", "unreadable"))
        and cur["unconverged"] == 0
        and cur["observer_unconverged"] == 0
        and cur["members_settled"]
        and cur["updates"]["refused"] == 0
        and cur["updates"]["unanswered"] == 0
        and cur["closed_by_server"] == 0
    )
    return events == 0 and checks and members and offline == 0 and lost_ok and states_ok


def num(v, digits=0):
    return f"{v:,.{digits}f}"


def at_most(measured, target, unit, digits=1):
    """Verdict of a measured value that must stay at or below target."""
    if measured is None:
        return "not measured"
    if measured <= target:
        return "met"
    over = measured - target
    return f"missed by {num(over, digits)}{unit} ({over / target:.0%})"


def at_least(measured, target, unit, digits=0):
    if measured is None:
        return "not measured"
    if measured >= target:
        return "met"
    under = target - measured
    return f"missed by {num(under, digits)}{unit} ({under / target:.0%})"


rows = []
hold = by_name.get("hold", {})
kib = (hold.get("gateway") or {}).get("kib_per_tab")
rows.append(
    (
        f"`hold` {num(hold.get('open_tabs_held', 0))} tabs, 1 node: gateway RSS growth per tab",
        "n/a" if kib is None else f"{kib:.2f} KiB",
        "≤ 5 KiB",
        at_most(kib, 5.0, " KiB", 2),
    )
)
storm = by_name.get("storm", {})
tps = storm.get("tabs_per_s_until_all_online")
rows.append(
    (
        f"`storm` {num(storm.get('connects', 0))} tabs ({storm.get('users', 0)} users × {storm.get('tabs', 0)}), 1 node: tabs/s until every observer saw every `online`",
        "n/a" if tps is None else f"{num(tps)} tabs/s ({storm.get('all_online_s', 0):.2f} s)",
        "≥ 8,000 tabs/s",
        at_least(tps, 8000.0, " tabs/s"),
    )
)
per_1000 = (storm.get("redis") or {}).get("per_1000_connects")
rows.append(
    (
        "`storm`: Redis MULTI/EXEC per 1,000 connects",
        "n/a" if per_1000 is None else f"{per_1000:.1f}",
        "≤ 20",
        at_most(per_1000, 20.0, "", 1),
    )
)
churn = by_name.get("churn", {})
cross_off = (churn.get("event_latency_cross_node") or {}).get("offline") or {}
p99 = cross_off.get("p99_us")
p99_ms = None if not cross_off.get("n") else p99 / 1000
p50_ms = None if not cross_off.get("n") else cross_off["p50_us"] / 1000
rows.append(
    (
        f"`churn` {num(churn.get('rate', 0))} tab opens+closes/s, 2 nodes: cross-node `offline` latency p50 / p99",
        "n/a" if p99_ms is None else f"{p50_ms:.1f} / **{p99_ms:.1f} ms** (n={num(cross_off['n'])})",
        "p99 ≤ 5 ms",
        at_most(p99_ms, 5.0, " ms"),
    )
)
if churn.get("failure"):
    rows.append(
        (
            "`churn`: missed / duplicated / out-of-order events; final state exact",
            f"FAILED: {churn['failure']}",
            "0 / 0 / 0; exact",
            "missed",
        )
    )
elif churn:
    missed = sum(churn[k]["missed"] for k in ("presence", "room"))
    dup = sum(churn[k]["duplicated"] for k in ("presence", "room"))
    ooo = sum(churn[k]["out_of_order"] for k in ("presence", "room"))
    rows.append(
        (
            "`churn`: missed / duplicated / out-of-order events; final state exact",
            f"{missed} / {dup} / {ooo}; {'exact' if correct(churn) else 'NOT exact'}",
            "0 / 0 / 0; exact",
            "met" if correct(churn) else "missed",
        )
    )
big = by_name.get("50k", {})
held = big.get("open_tabs_held", 0)
exact = bool(big) and correct(big)
rows.append(
    (
        f"3 nodes holding {num(held)} tabs ({big.get('procs', 0)} load processes): presence exact",
        f"{num(held)} tabs held, {'exact' if exact else 'NOT exact'}",
        "≥ 50,000 tabs, exact",
        "met"
        if exact and held >= 50000
        else ("missed: not exact" if not exact else f"missed by {num(50000 - held)} tabs"),
    )
)
# With --only, the issue-7 runs not in the set have no rows.
kept, i = [], 0
for name, n in (("hold", 1), ("storm", 2), ("churn", 2), ("50k", 1)):
    if name in by_name:
        kept += rows[i : i + n]
    i += n
rows = kept
fan = by_name.get("fanout", {})
f = fan.get("fanout") or {}
if f:
    rows.append(
        (
            f"`fanout` {f['rooms']} rooms of {fan['room_size']} users × {fan['tabs']} tabs, 2 nodes, {num(fan['rate'])} leaves+joins/s: events delivered to members",
            f"{num(f['member_events_per_s'])} events/s; member `left` p50 / p99 {f['member_latency_left']['p50_us'] / 1000:.1f} / {f['member_latency_left']['p99_us'] / 1000:.1f} ms; {'exact' if correct(fan) else 'NOT exact'}",
            "no target",
            "measured",
        )
    )

def reload_row(name, grace_text):
    run = by_name.get(name, {})
    rel = run.get("reload")
    if not rel:
        return None
    return (
        f"`churn --reload-ms {rel['reload_ms']}` {num(run.get('users', 0))} users × {run.get('tabs', 0)} tab, 2 nodes, {grace_text}: flaps observers saw",
        f"{num(rel['flaps'])} of {num(rel['reloads_of_last_tab'])} reloads of a last tab (room flaps {num(rel['room_flaps'])} of {num(rel['reloads_of_last_room_tab'])}); {'correct' if correct(run) else 'NOT correct'}",
        rel,
    )


row = reload_row("reload-grace", "grace 5 s" if not quick else "grace 2 s")
if row:
    text, measured, rel = row
    rows.append((text, measured, "0 (issue 13)", "met" if rel["flaps"] == 0 and rel["room_flaps"] == 0 else "missed"))
row = reload_row("reload-nograce", "no grace")
if row:
    text, measured, rel = row
    same = rel["flaps"] == rel["reloads_of_last_tab"] and rel["room_flaps"] == rel["reloads_of_last_room_tab"]
    rows.append((text, measured, "= reloads of a last tab (the tool sees flaps)", "met" if same else "missed"))
loss_run = by_name.get("nodeloss", {})
loss = loss_run.get("nodeloss")
if loss:
    load = f"`nodeloss` {num(loss_run.get('users', 0))} tabs on 3 nodes, kill -9 of one ({num(loss['lost_users'])} users), {num(loss['returned_users'])} back within {loss['returns_s']:.1f} s"
    rows.append(
        (
            f"{load}: `offline`s of the users who came back",
            f"{num(loss['returned_offlines'])} (`left` {num(loss['returned_lefts'])}); {'correct' if correct(loss_run) else 'NOT correct'}",
            "0 (issue 13)",
            "met" if loss["returned_offlines"] == 0 and loss["returned_lefts"] == 0 else "missed",
        )
    )
    d = loss["time_to_offline"]
    rows.append(
        (
            f"{load}: kill → `offline` of the others, p50 / p90 / p99 / max",
            f"{d['p50_ms'] / 1000:.2f} / {d['p90_ms'] / 1000:.2f} / {d['p99_ms'] / 1000:.2f} / {d['max_ms'] / 1000:.2f} s; {num(loss['gone_offlines'])} of {num(loss['gone_offlines_expected'])} seen, each once",
            "lease + reaper tick + grace",
            "measured",
        )
    )

cur_run = by_name.get("cursors", {})
cur = cur_run.get("cursors")
if cur:
    lat = cur["latency"]
    cpu = cur.get("cpu_us_per_delivery")
    cmds = cur.get("redis_commands_per_s")
    u = cur["updates"]
    rows.append(
        (
            f"`cursors` {cur['rooms']} rooms of {cur['room_size']} members, 2 nodes, {num(cur['rate_per_member'])} updates/s per member for {cur['moves_s']:.0f} s: `updated` delivered to members",
            f"{num(cur['deliveries_per_s'])}/s; p50 / p99 {lat['p50_us'] / 1000:.1f} / {lat['p99_us'] / 1000:.1f} ms; "
            f"{'n/a' if cpu is None else f'{cpu:.1f} µs'} gateway CPU per delivery; {'n/a' if cmds is None else num(cmds)} Redis commands/s; "
            f"sent {num(u['sent'])}, written {num(u['written'])}, superseded {num(u['superseded'])}, refused {num(u['refused'])}; "
            f"{'correct' if correct(cur_run) else 'NOT correct'}",
            "no 4029/4008, every last state (issue 14)",
            "met" if correct(cur_run) else "missed",
        )
    )

date = datetime.date.today().isoformat()
title = "quick check (small sizes; not comparable to the targets)" if quick else "standard set"
out = []
out.append(f"## presenced-load {title}, {date}, commit {os.environ['BENCH_COMMIT']}")
out.append("")
out.append("```sh")
out.append(os.environ["BENCH_COMMAND"])
out.append("```")
out.append("")
out.append(
    f"Machine: {os.environ['BENCH_MACHINE']}; loopback only. Gateways, "
    f"redis-server and the load tool share the cores. {os.environ['BENCH_ELAPSED']} s of runs."
)
out.append("")
out.append("| target (issue 7, issue 13, issue 14) | measured | target | verdict |")
out.append("| --- | --- | --- | --- |")
for row in rows:
    out.append("| " + " | ".join(row) + " |")
out.append("")
out.append("Each run on fresh gateways (`--dev --redis …` plus the flags shown), one shared Redis:")
out.append("")
out.append("| run | load | gateway flags | result | errors | connects/s | connect p99 | event p99 online / offline / joined / left (cross-node on 2+ nodes) | gateway CPU in all, RSS held |")
out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for run in runs:
    r = run["r"]
    if not r:
        out.append(f"| {run['name']} | `{run['scenario']} {run['args']}` | {run['flags'] or 'default'} | FAILED (no report) | | | | | |")
        continue
    if "failure" in r:
        out.append(f"| {run['name']} | `{run['scenario']} {run['args']}` | {run['flags'] or 'default'} | FAILED: {r['failure']} | | | | | |")
        continue
    lat = r["event_latency_cross_node"] if run["nodes"] > 1 else r["event_latency"]
    kinds = " / ".join(
        "–" if not lat[k]["n"] else f"{lat[k]['p99_us'] / 1000:.1f}" for k in ("online", "offline", "joined", "left")
    )
    errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "none"
    gw = r["gateway"]
    rss = sum((t.get("held") or {}).get("rss_bytes", 0) for t in gw["targets"]) / 2**20
    cpu = gw.get("cpu_seconds")
    cpu_text = "n/a" if cpu is None else f"{cpu:.2f} s"
    out.append(
        f"| {run['name']} | `{run['scenario']} {run['args']}` on {run['nodes']} node(s) | "
        f"{run['flags'] or 'default'} | {'CORRECT' if correct(r) else 'INCORRECT'} | {errors} | "
        f"{num(r['connects_per_s'])} | {r['connect_latency']['p99_us'] / 1000:.1f} ms | {kinds} ms | "
        f"{cpu_text}, {rss:.0f} MiB |"
    )
print("\n".join(out))
