#!/usr/bin/env python3
"""Checks dashboard.json, alerts.yml and docs/metrics.md against a real wsgate exposition.

Input: the scrapes that exercise.py wrote (OUT_DIR/scrape-0.prom before traffic, scrape-1.prom
and scrape-2.prom after each round). Prints
one line per thing checked and exits 1 if any failed:

- every wsgate_* name in dashboard.json and alerts.yml is exported by the real gateway;
- every metric the gateway exports is on the dashboard, and documented in docs/metrics.md's
  reference table with the type and labels it really has; the metrics docs/metrics.md says
  appear only with their first event are exactly those missing from a scrape before traffic;
- each use of a metric fits its type: counters only inside rate/irate/increase/resets/changes,
  gauges never there, histogram buckets only in histogram_quantile with `le` kept;
- the dashboard's structure (datasource variable, instance and route variables, every panel on
  ${datasource}, every selector filtered by $instance and, where the metric has a route label,
  by $route);
- alerts.test.yml has, for each alert of alerts.yml, a case where it fires and one where it
  does not;
- with promtool, on the two scrapes as input series (a minute apart, with job and instance
  labels as Prometheus adds them): every panel query and both variable queries return at least
  one series, and every selector in alerts.yml matches at least one series;
- with promtool, alerts.yml on those scrapes continued for half an hour: exactly the alerts the
  exercise provokes fire (REAL_DATA_FIRES), with their labels and annotations, and no other.

Usage: verify.py MONITORING_DIR OUT_DIR DOCS_METRICS_MD.  Stdlib only (Python 3.11).
"""

import json
import os
import re
import subprocess
import sys

JOB = "wsgate"
# Grafana's macros, replaced by what Grafana would send for a 1-minute scrape interval.
MACROS = {"$__rate_interval": "5m", "$__range": "5m", "$__interval": "1m", "$instance": ".*", "$route": ".*"}
COUNTER_WRAPPERS = r"(rate|irate|increase|resets|changes)\(\s*$|group(\s+by\s*\([^)]*\))?\s*\(\s*$"
RATE_WRAPPERS = r"(rate|irate|increase|deriv)\(\s*$"
SELECTOR = re.compile(r"\b((?:wsgate_\w+)|up)\b(\{[^}]*\})?")

failures = 0
OUT = None  # the exercise's output directory, where the generated promtool files go too


def report(ok, what):
    global failures
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        failures += 1


# ---- the exposition -------------------------------------------------------------------------

def parse_labels(text):
    return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', text or ""))


def parse_exposition(text):
    """Returns ({(name, frozenset(labels)): value}, {family: type})."""
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
            if not m:
                raise SystemExit(f"verify: cannot parse exposition line: {line}")
            samples[(m.group(1), frozenset(parse_labels(m.group(3)).items()))] = m.group(4)
    return samples, types


def family(name, types):
    """The metric family a sample name belongs to (histogram suffixes stripped)."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
            return name[: -len(suffix)]
    return name


def series_file(scrapes, instance):
    """promtool input_series: one entry per series, its values a minute apart ('_' if absent)."""
    out = []
    for key in sorted(set().union(*scrapes)):
        name, labels = key
        labels = dict(labels, job=JOB, instance=instance)
        sel = name + "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"
        out.append((sel, " ".join(s.get(key, "_") for s in scrapes)))
    out.append((f'up{{instance="{instance}",job="{JOB}"}}', " ".join("1" for _ in scrapes)))
    return out


def esc(v):
    return v.replace("\\", "\\\\").replace('"', '\\"')


def yq(s):
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(s)


def promtool_nonempty(series, expr):
    """True if `expr` returns at least one sample at the second scrape; else promtool's output."""
    lines = ["rule_files: []", "evaluation_interval: 1m", "tests:", "  - interval: 1m", "    input_series:"]
    for sel, values in series:
        lines += [f"      - series: {yq(sel)}", f"        values: {yq(values)}"]
    lines += ["    promql_expr_test:", f"      - expr: {yq(f'(count({expr}) > bool 0) or vector(0)')}",
              "        eval_time: 1m", "        exp_samples:", "          - labels: '{}'", "            value: 1"]
    path = os.path.join(OUT, "panel-test.yml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    r = subprocess.run(["promtool", "test", "rules", path], capture_output=True, text=True)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


MINUTES = 30
# What the exercise's traffic makes fire, taking the two scrapes as a minute apart: the dead pool
# member stays ejected, a token names a target outside the allow-list each round, the capped
# route sheds a session each round, and the firehose route discards megabytes each round. Every
# other alert must stay quiet (1 failed connect, 1 TLS failure, 1 bad token a minute are below
# their floors; a rejected and an applied reload in the same minute leave the config applied).
REAL_DATA_FIRES = {
    "WsgatePoolMemberDown": [{"route": "pool", "backend": "dead"}],
    "WsgateTargetNotAllowed": [{"route": "desks"}],
    "WsgateSessionsShed": [{"route": "capped", "reason": "max_sessions"}],
    "WsgateDroppedBytes": [{"route": "firehose"}],
}


def series_extended(scrapes, types, instance):
    """The last two scrapes as input series continued for MINUTES minutes."""
    a, b = scrapes[-2], scrapes[-1]
    out = []
    for key in sorted(set(a) | set(b)):
        name, labels = key
        labels = dict(labels, job=JOB, instance=instance)
        sel = name + "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"
        fam = family(name, types)
        counter = types.get(fam) == "counter" or (types.get(fam) == "histogram")
        first = a.get(key, "_")
        if key not in b:
            values = f"{first} " + " ".join("_" for _ in range(MINUTES))
        elif counter and first != "_":
            values = f"{first} {b[key]}+{float(b[key]) - float(first)!r}x{MINUTES - 1}"
        else:
            values = f"{first} {b[key]}x{MINUTES - 1}"
        out.append((sel, values))
    out.append((f'up{{instance="{instance}",job="{JOB}"}}', f"1x{MINUTES}"))
    return out


def render(text, labels):
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)


def alerts_on_real_data(series, rules, instance, mon):
    lines = [f"rule_files: [{yq(os.path.abspath(os.path.join(mon, 'alerts.yml')))}]", "evaluation_interval: 1m", "tests:",
             "  - interval: 1m", "    input_series:"]
    for sel, values in series:
        lines += [f"      - series: {yq(sel)}", f"        values: {yq(values)}"]
    lines.append("    alert_rule_test:")
    for alert, rule in rules.items():
        lines += [f"      - eval_time: {MINUTES}m", f"        alertname: {alert}"]
        want = REAL_DATA_FIRES.get(alert, [])
        if not want:
            lines.append("        exp_alerts: []")
            continue
        lines.append("        exp_alerts:")
        for labels in want:
            full = dict(labels, job=JOB, instance=instance)
            lines.append(f"          - exp_labels: {json.dumps(dict(full, severity=rule['severity']))}")
            lines.append("            exp_annotations: " + json.dumps(
                {"summary": render(rule["summary"], full), "description": render(rule["description"], full)}))
    path = os.path.join(OUT, "alerts-real-data-test.yml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    r = subprocess.run(["promtool", "test", "rules", path], capture_output=True, text=True)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def substitute(expr):
    for k in sorted(MACROS, key=len, reverse=True):
        expr = expr.replace(k, MACROS[k])
    return expr


# ---- alerts.yml without a YAML library ------------------------------------------------------

def alert_rules(text):
    """{alert: {expr, severity, summary, description}} from alerts.yml, in file order: `expr:`
    inline or an indented block scalar, `summary:` double-quoted, `description: >-` folded."""
    rules, lines, i = {}, text.splitlines(), 0
    alert = None
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^\s*- alert: (\S+)", line)
        if m:
            alert = m.group(1)
            rules[alert] = {}
        m = re.match(r"^(\s*)(expr|severity|summary|description): ?(.*)$", line)
        if m and alert:
            indent, key, value = len(m.group(1)), m.group(2), m.group(3).strip()
            if value in ("|", ">", "|-", ">-"):
                block = []
                while i + 1 < len(lines) and (not lines[i + 1].strip() or len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent):
                    i += 1
                    block.append(lines[i].strip())
                value = ("\n" if value.startswith("|") else " ").join(block).strip()
            elif value.startswith('"'):
                value = json.loads(value)
            rules[alert][key] = value
        i += 1
    return rules


def strip_comments(expr):
    return re.sub(r"#[^\n]*", "", expr)


# ---- checks ---------------------------------------------------------------------------------

def check_uses(where, expr, types):
    """Each metric in `expr` used as its type allows."""
    problems = []
    for m in SELECTOR.finditer(expr):
        name = m.group(1)
        if name == "up":
            continue
        fam = family(name, types)
        kind = types.get(fam)
        before = expr[: m.start()]
        if kind == "counter" or (kind == "histogram" and name.endswith(("_count", "_sum"))):
            if not re.search(COUNTER_WRAPPERS, before):
                problems.append(f"counter {name} outside rate/increase")
        elif kind == "gauge":
            if re.search(RATE_WRAPPERS, before) and not re.search(r"deriv\(\s*$", before):
                problems.append(f"gauge {name} inside rate/increase")
        elif kind == "histogram":
            if not name.endswith("_bucket"):
                problems.append(f"histogram {name} used without _bucket/_sum/_count")
            elif not (re.search(r"(rate|increase)\(\s*$", before) and "histogram_quantile(" in expr
                      and re.search(r"by\s*\([^)]*\ble\b", expr)):
                problems.append(f"{name} not in histogram_quantile(..., sum by (..., le) (rate(...)))")
    report(not problems, f"types: {where}" + (": " + "; ".join(problems) if problems else ""))


def main():
    global OUT
    mon, OUT, docs_path = sys.argv[1], sys.argv[2], sys.argv[3]
    scrapes = []
    types = {}
    for i in (1, 2):
        with open(os.path.join(OUT, f"scrape-{i}.prom")) as f:
            s, t = parse_exposition(f.read())
        scrapes.append(s)
        types.update(t)
    with open(os.path.join(OUT, "instance")) as f:
        instance = f.read().strip()
    exported = {name for name, _ in scrapes[1]}
    families = {family(n, types) for n in exported}
    labels_of = {}
    for name, labels in scrapes[1]:
        labels_of.setdefault(family(name, types), set()).update(k for k, _ in labels if k != "le")
    series = series_file(scrapes, instance)

    with open(os.path.join(mon, "dashboard.json")) as f:
        dash_text = f.read()
    dash = json.loads(dash_text)
    with open(os.path.join(mon, "alerts.yml")) as f:
        alerts_text = f.read()
    with open(os.path.join(mon, "alerts.test.yml")) as f:
        tests_text = f.read()
    with open(docs_path) as f:
        docs = f.read()

    # 1. Names.
    for where, text in (("dashboard.json", dash_text), ("alerts.yml", alerts_text)):
        names = set(re.findall(r"\bwsgate_[a-z0-9_]+", text))
        missing = sorted(n for n in names if n not in exported and n not in families)
        report(not missing, f"names: the {len(names)} wsgate_* names in {where} are all exported"
               + (f"; not exported: {', '.join(missing)}" if missing else ""))
    on_dash = set(re.findall(r"\bwsgate_[a-z0-9_]+", dash_text))
    absent = sorted(f for f in families if not any(family(n, types) == f for n in on_dash))
    report(not absent, f"coverage: all {len(families)} exported metrics are on the dashboard"
           + (f"; not on it: {', '.join(absent)}" if absent else ""))

    # 2. docs/metrics.md's reference table matches the exposition.
    table = {m.group(1): (m.group(2), set(re.findall(r"`(\w+)`", m.group(3))))
             for m in re.finditer(r"^\| \[`(wsgate_\w+)`\]\([^)]*\) \| (\w+) \| ([^|]*) \|", docs, re.M)}
    for fam in sorted(families):
        if fam not in table:
            report(False, f"docs: {fam} is exported but not in docs/metrics.md's reference table")
            continue
        kind, labels = table[fam]
        real = labels_of.get(fam, set())
        report(kind == types.get(fam) and labels == real,
               f"docs: {fam} is a {types.get(fam)} with labels {{{', '.join(sorted(real))}}}"
               + ("" if kind == types.get(fam) and labels == real else
                  f"; docs/metrics.md says {kind} {{{', '.join(sorted(labels))}}}"))
    # The metrics docs/metrics.md says appear with their first occurrence are exactly those
    # missing before any traffic.
    with open(os.path.join(OUT, "scrape-0.prom")) as f:
        at_start = {family(n, types) for n, _ in parse_exposition(f.read())[0]}
    m = re.search(r"The others appear with their first occurrence:(.*?)Write alert expressions", docs, re.S)
    later = set(re.findall(r"`(wsgate_\w+)`", m.group(1) if m else ""))
    report(later == families - at_start,
           f"docs: the {len(later)} metrics docs/metrics.md says appear with their first event are the ones "
           f"absent before traffic ({len(at_start)} present)"
           + ("" if later == families - at_start else
              f"; absent at start: {', '.join(sorted(families - at_start))}; docs say: {', '.join(sorted(later))}"))
    stale = sorted(set(table) - families)
    report(not stale, "docs: every metric in docs/metrics.md's table is exported"
           + (f"; not exported: {', '.join(stale)}" if stale else ""))

    # 3. Dashboard structure.
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    report(ds.get("type") == "datasource" and ds.get("query") == "prometheus",
           "dashboard: a ${datasource} variable of type datasource, Prometheus")
    for v in ("instance", "route"):
        var = variables.get(v, {})
        report(var.get("type") == "query" and var.get("datasource", {}).get("uid") == "${datasource}"
               and var.get("includeAll") and var.get("allValue") == ".*",
               f"dashboard: a ${v} query variable on ${{datasource}} with All = .*")
    report(isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] >= 39 and dash.get("uid"),
           f"dashboard: uid {dash.get('uid')!r}, schemaVersion {dash.get('schemaVersion')}")
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    report(len(ids) == len(set(ids)), f"dashboard: {len(panels)} panels with unique ids")
    for p in panels:
        problems = []
        if p.get("datasource", {}).get("uid") != "${datasource}":
            problems.append("datasource is not ${datasource}")
        if not p.get("targets"):
            problems.append("no query")
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"target {t['refId']} datasource is not ${{datasource}}")
            for m in SELECTOR.finditer(t["expr"]):
                matchers = m.group(2) or ""
                if 'instance=~"$instance"' not in matchers:
                    problems.append(f"{m.group(1)} not filtered by $instance")
                if "route" in labels_of.get(family(m.group(1), types), set()) and 'route=~"$route"' not in matchers:
                    problems.append(f"{m.group(1)} not filtered by $route")
        report(not problems, f"dashboard: panel {p['title']!r} structure" + (": " + "; ".join(problems) if problems else ""))

    # 4. Types, and every query against the real data.
    for p in panels:
        for t in p["targets"]:
            where = f"panel {p['title']!r} {t['refId']}"
            check_uses(where, t["expr"], types)
            ok, out = promtool_nonempty(series, substitute(t["expr"]))
            report(ok, f"data: {where} returns series" + ("" if ok else f"\n{out}"))
    for name in ("instance", "route"):
        q = variables[name]["definition"]
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
        ok, out = promtool_nonempty(series, f"count by ({m.group(2)}) ({substitute(m.group(1))})")
        report(ok, f"data: variable ${name} ({q}) has values" + ("" if ok else f"\n{out}"))
    rules = alert_rules(alerts_text)
    for alert, rule in rules.items():
        expr = strip_comments(rule["expr"])
        check_uses(f"alert {alert}", expr, types)
        sels = sorted({m.group(0) for m in SELECTOR.finditer(expr)})
        dead = []
        for sel in sels:
            ok, _ = promtool_nonempty(series, sel)
            if not ok:
                dead.append(sel)
        report(not dead, f"data: alert {alert}: its {len(sels)} selectors each match series"
               + (f"; match nothing: {', '.join(dead)}" if dead else ""))

    # 5. The alerts on the real data, continued for half an hour at the pace of the two scrapes
    # (gauges hold, counters keep growing by what they grew between the scrapes): exactly the
    # alerts the exercise provokes fire, with their labels and rendered annotations.
    ok, out = alerts_on_real_data(series_extended(scrapes, types, instance), rules, instance, mon)
    if ok:
        for alert in rules:
            want = REAL_DATA_FIRES.get(alert, [])
            report(True, f"real data: {alert} " + (f"fires for {', '.join(str(w) for w in want)}" if want else "stays quiet"))
    else:
        report(False, f"real data: the alerts fire as expected (firing: {', '.join(REAL_DATA_FIRES)}; the rest quiet)\n{out}")

    # 6. Each alert fires in one test case and stays quiet in another.
    cases = re.findall(r"alertname: (\S+)\n\s+exp_alerts:( \[\])?", tests_text)
    for alert in rules:
        fires = any(a == alert and not q for a, q in cases)
        quiet = any(a == alert and q for a, q in cases)
        report(fires and quiet, f"tests: {alert} has a firing and a quiet case in alerts.test.yml")

    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
