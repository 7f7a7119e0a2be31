"""The evaluation report: one self-contained HTML page (figures embedded as base64 PNG, inline CSS,
no scripts, nothing fetched) plus the same figures as files, and the compact terminal table."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rewardforge.eval import plots

SECTION_TITLES = [
    ("accuracy", "Accuracy"),
    ("sections", "Section scores"),
    ("calibration", "Calibration"),
    ("uncertainty", "Ensemble uncertainty"),
    ("length", "Length bias"),
    ("distributions", "Reward distributions"),
    ("strength", "Preference strength"),
    ("best-of-n", "Best-of-N"),
    ("lists", "Ranked lists"),
    ("regression", "Regression"),
    ("comparison", "Model comparison"),
    ("mistakes", "Most confident mistakes"),
    ("data", "Data"),
]

CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:16px 28px 60px;background:#fff}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:19px;border-bottom:2px solid #e3e3e3;padding-bottom:4px;margin-top:34px}
h3{font-size:15px;margin:22px 0 6px}.meta{color:#555;font-size:13px;line-height:1.5}
nav{background:#f3f5f8;border:1px solid #e1e4e8;border-radius:6px;padding:8px 12px;font-size:13px;margin:12px 0}
nav a{margin-right:14px;color:#0366d6;text-decoration:none;white-space:nowrap}
p.how{color:#555;font-size:13px;margin:4px 0 10px;max-width:980px}
p.na{color:#777;font-style:italic;font-size:13px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 12px}
th,td{border-bottom:1px solid #e6e6e6;padding:4px 9px;text-align:right;vertical-align:top}
th{background:#f6f8fa;font-weight:600;position:sticky;top:0}
td.l,th.l{text-align:left}tr.sub td{color:#444;background:#fcfcfc}tr.sub td.l.s{padding-left:22px}
tr.total td{font-weight:600;border-top:2px solid #ccc}
.good{color:#1a7f37}.bad{color:#cf222e}.muted{color:#888}
img{max-width:100%;height:auto;display:block;margin:6px 0 14px;border:1px solid #eee}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{border:1px solid #e1e4e8;border-radius:6px;padding:8px 12px;min-width:150px;background:#fcfdff}
.card .v{font-size:22px;font-weight:600}.card .k{font-size:12px;color:#555}
details{font-size:12.5px;margin:2px 0}summary{cursor:pointer}
pre{white-space:pre-wrap;word-break:break-word;background:#f6f8fa;padding:6px 8px;border-radius:4px;margin:4px 0;max-height:260px;overflow:auto}
.ex{border:1px solid #e6e6e6;border-radius:6px;padding:6px 10px;margin:8px 0}
.ex .hd{font-size:12px;color:#555;margin-bottom:4px}
section.skip{display:flex;gap:10px;align-items:baseline;font-size:13px;margin:2px 0}section.skip b{min-width:190px}
section.skip p{margin:2px 0}.two{display:grid;grid-template-columns:1fr 1fr;gap:10px}
.tag{display:inline-block;font-size:11px;padding:0 6px;border-radius:8px;background:#eef;color:#335;margin-left:6px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _pct(x: Any, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _num(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _tag(subset: str) -> str:
    from rewardforge.eval.data import NO_SUBSET

    return "" if subset == NO_SUBSET else f" <span class=tag>{_e(subset)}</span>"


def _pval(p: Any) -> str:
    if p is None:
        return "–"
    return f"{p:.2g}" if p < 1e-3 else f"{p:.4f}"


def _ci(st: dict[str, Any] | None) -> str:
    if not st or st.get("ci_low") is None:
        return "–"
    return f"{100 * st['ci_low']:.1f}–{100 * st['ci_high']:.1f}"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:80] or "x"


class _Figures:
    """Writes each PNG to ``out/plots`` and returns an ``<img>`` with it embedded."""

    def __init__(self, out: Path):
        self.dir = out / "plots"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files: list[str] = []

    def img(self, name: str, png: bytes, alt: str) -> str:
        fname = f"{_slug(name)}.png"
        (self.dir / fname).write_bytes(png)
        self.files.append(f"plots/{fname}")
        return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


# ------------------------------------------------------------------ tables shared by terminal and HTML


def pair_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per pair dataset, its subsets, and the pooled total: the accuracy table."""
    models = [m["name"] for m in result["models"]]
    res = result["results"]
    rows = []
    for ds in result["datasets"]:
        name = ds["name"]
        first = res[models[0]]["datasets"].get(name, {})
        kind = first.get("kind", ds["kind"])
        if kind == "empty":
            rows.append({"dataset": name, "subset": "", "kind": "empty", "n": 0, "values": [None] * len(models),
                         "note": f"empty: {ds['rows_read']} rows read, {ds['skipped_bad_rows']} skipped"})
            continue
        if kind != "pairs":
            continue
        rows.append({"dataset": name, "subset": "all", "kind": "dataset", "n": first["overall"]["n"],
                     "values": [res[m]["datasets"][name]["overall"] for m in models],
                     "ece": [res[m]["datasets"][name]["calibration"]["ece"] for m in models],
                     "baseline": first["length"]["longer_baseline"]})
        for g in first["subsets"]:
            rows.append({"dataset": name, "subset": g, "kind": "subset", "n": first["subsets"][g]["n"],
                         "values": [res[m]["datasets"][name]["subsets"].get(g) for m in models]})
    pooled = res[models[0]].get("pooled")
    if pooled:
        rows.append({"dataset": "ALL pair data", "subset": "pooled", "kind": "total", "n": pooled["overall"]["n"],
                     "values": [res[m]["pooled"]["overall"] for m in models],
                     "ece": [res[m]["pooled"]["calibration"]["ece"] for m in models],
                     "baseline": pooled["length"]["longer_baseline"]})
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The compact terminal table: one row per dataset/subset (pairs), then best-of-N and regression rows."""
    models = [m["name"] for m in result["models"]]
    multi = len(models) > 1
    lines = []
    rows = pair_rows(result)
    if rows:
        w = max([len("dataset")] + [len(r["dataset"]) for r in rows]) + 1
        ws = max([len("subset")] + [len(str(r["subset"])) for r in rows]) + 1
        w, ws = min(w, 34), min(ws, 26)
        if multi:
            head = f"{'dataset':<{w}}{'subset':<{ws}}{'pairs':>7}" + "".join(f"  {('acc ' + m)[:16]:>16}" for m in models)
        else:
            head = f"{'dataset':<{w}}{'subset':<{ws}}{'pairs':>7}{'accuracy':>10}{'95% CI':>14}{'ties':>6}{'ECE':>7}{'longer':>8}"
        lines += [f"model: {models[0]}" if not multi else "models: " + ", ".join(models), head, "-" * len(head)]
        for r in rows:
            ds = r["dataset"] if r["kind"] != "subset" else ""
            ds = ds if len(ds) < w else ds[: w - 2] + "…"
            sub = str(r["subset"])
            sub = sub if len(sub) < ws else sub[: ws - 2] + "…"
            if r["kind"] == "empty":
                lines.append(f"{ds:<{w}}{'':<{ws}}{0:>7}  ({r['note']})")
                continue
            if multi:
                vals = "".join(f"  {_pct(v.get('accuracy') if v else None):>16}" for v in r["values"])
                lines.append(f"{ds:<{w}}{sub:<{ws}}{r['n']:>7}{vals}")
            else:
                v = r["values"][0] or {}
                ece = _num(r["ece"][0]) if r.get("ece") else ""
                base = _pct(r.get("baseline")) if r.get("baseline") is not None else ""
                lines.append(f"{ds:<{w}}{sub:<{ws}}{r['n']:>7}{_pct(v.get('accuracy')):>10}{_ci(v):>14}"
                             f"{v.get('ties', 0) if v.get('n') else '':>6}{ece:>7}{base:>8}")
        lines.append("accuracy counts ties as ½; longer = accuracy of always picking the longer response")
    res = result["results"]
    bon = [d for d in result["datasets"] if res[models[0]]["datasets"].get(d["name"], {}).get("kind") == "best_of_n"]
    if bon:
        lines += ["", f"{'best-of-N dataset':<30}{'prompts':>8}{'mean K':>8}{'random':>8}" + "".join(f"  {('top1 ' + m)[:16]:>16}" for m in models)]
        for d in bon:
            f = res[models[0]]["datasets"][d["name"]]
            lines.append(f"{d['name'][:29]:<30}{f['n']:>8}{_num(f['mean_k'], 1):>8}{_pct(f['random_baseline']):>8}"
                         + "".join(f"  {_pct(res[m]['datasets'][d['name']]['top1']):>16}" for m in models))
    lists = [d for d in result["datasets"] if res[models[0]]["datasets"].get(d["name"], {}).get("kind") == "lists"]
    if lists:
        lines += ["", f"{'list dataset':<26}{'model':<18}{'lists':>6}{'pairs':>7}{'pair acc':>9}{'top-1':>7}{'random':>7}"
                      f"{'tau':>7}{'NDCG':>7}"]
        for d in lists:
            for m in models:
                f = res[m]["datasets"][d["name"]]
                lines.append(f"{d['name'][:25]:<26}{m[:17]:<18}{f['lists']:>6}{f['pairs']:>7}{_pct(f['accuracy']):>9}"
                             f"{_pct(f['top1']):>7}{_pct(f.get('random_top1')):>7}{_num(f['kendall_tau'], 3):>7}{_num(f['ndcg'], 3):>7}")
        lines.append("pair acc: over every ordered pair of a list (score ties make no pair; reward ties count ½)")
    rated = [d for d in result["datasets"] if res[models[0]]["datasets"].get(d["name"], {}).get("kind") == "rated"]
    if rated:
        lines += ["", f"{'rated dataset':<26}{'attribute':<18}{'n':>6}{'MSE':>9}{'MAE':>8}{'Pearson':>9}{'Spearman':>9}"]
        for m in models:
            if multi:
                lines.append(f"[{m}]")
            for d in rated:
                for a, st in res[m]["datasets"][d["name"]]["attributes"].items():
                    lines.append(f"{d['name'][:25]:<26}{a[:17]:<18}{st['n']:>6}{_num(st['mse']):>9}{_num(st['mae']):>8}"
                                 f"{_num(st['pearson']):>9}{_num(st['spearman']):>9}")
    sec = res[models[0]].get("sections")
    if sec:
        lines += ["", "sections: " + ", ".join(f"{k} {_pct(v['score'])}" for k, v in sec["sections"].items())
                  + f"; overall {_pct(sec['overall'])}" + (f" ({models[0]})" if multi else "")]
    return "\n".join(lines)


# ------------------------------------------------------------------ HTML sections


def verdict(overall: dict[str, Any], longer: float | None) -> str:
    """The headline: is this accuracy a result? (chance: the 95% interval vs 0.5; the pick-the-longer baseline)."""
    lo, hi = overall.get("ci_low"), overall.get("ci_high")
    if lo is None:
        return ""
    chance = "better than chance" if lo > 0.5 else ("worse than chance" if hi < 0.5 else "not distinguishable from chance")
    if longer is None:
        return chance
    rel = "above" if lo > longer else ("below" if hi < longer else "within the interval of")
    return f"{chance}; {rel} the pick-the-longer-response baseline ({_pct(longer)})"


def _accuracy_section(result, evals, figs) -> str:
    models = [m["name"] for m in result["models"]]
    rows = pair_rows(result)
    if not rows:
        return '<p class="na">No preference-pair data was evaluated.</p>'
    multi = len(models) > 1
    out = ['<p class="how">Pairwise accuracy: the fraction of pairs where the chosen response gets the higher reward; '
           'a tie (equal rewards) counts one half. The interval is a 95% Wilson interval. "Longer" is the accuracy of the '
           'trivial baseline that always prefers the longer response: a model near it may be rewarding length.</p>']
    cards = []
    for m in models:
        r = result["results"][m]
        st = (r.get("pooled") or next((v for v in r["datasets"].values() if v.get("kind") == "pairs"), {})).get("overall")
        if st and st.get("n"):
            ds = r.get("pooled") or next((v for v in r["datasets"].values() if v.get("kind") == "pairs"), {})
            cards.append(f'<div class="card"><div class="k">{_e(m)}</div><div class="v">{_pct(st["accuracy"])}</div>'
                         f'<div class="k">{st["n"]} pairs, CI {_ci(st)}%</div>'
                         f'<div class="k verdict">{_e(verdict(st, (ds.get("length") or {}).get("longer_baseline")))}</div></div>')
    out.append(f'<div class="cards">{"".join(cards)}</div>')
    head = "<tr><th class=l>dataset</th><th class=l>subset</th><th>pairs</th>"
    for m in models:
        head += f"<th>accuracy<br><span class=muted>{_e(m)}</span></th><th>95% CI</th><th>ties</th><th>ECE</th>"
    head += "<th>longer<br>baseline</th></tr>"
    body = []
    for r in rows:
        cls = {"subset": "sub", "total": "total"}.get(r["kind"], "")
        if r["kind"] == "empty":
            body.append(f'<tr><td class=l>{_e(r["dataset"])}</td><td class="l muted" colspan="{2 + 4 * len(models) + 1}">{_e(r["note"])}</td></tr>')
            continue
        tds = f'<td class=l>{_e(r["dataset"] if r["kind"] != "subset" else "")}</td><td class="l s">{_e(r["subset"])}</td><td>{r["n"]}</td>'
        for j, v in enumerate(r["values"]):
            if not v or not v.get("n"):
                tds += '<td class=muted>no pairs</td><td></td><td></td><td></td>'
                continue
            accs = [(x or {}).get("accuracy") for x in r["values"]]
            best = multi and v["accuracy"] == max(a for a in accs if a is not None) and accs.count(v["accuracy"]) == 1
            acc = f"<b>{_pct(v['accuracy'])}</b>" if best else _pct(v["accuracy"])
            ece = _num(r["ece"][j]) if r.get("ece") else ""
            tds += f"<td>{acc}</td><td class=muted>{_ci(v)}</td><td>{v['ties']}</td><td>{ece}</td>"
        tds += f"<td>{_pct(r.get('baseline')) if r.get('baseline') is not None else ''}</td>"
        body.append(f'<tr class="{cls}">{tds}</tr>')
    out.append(f"<table>{head}{''.join(body)}</table>")
    fig_rows = [{"label": r["dataset"] if r["kind"] != "subset" else r["subset"], "indent": r["kind"] == "subset",
                 "values": r["values"], "baseline": r.get("baseline")} for r in rows if r["kind"] != "empty"]
    if fig_rows:
        out.append(figs.img("accuracy", plots.accuracy_overview(fig_rows, models), "accuracy per dataset and subset"))
    return "\n".join(out)


def _sections_section(result) -> str:
    models = [m["name"] for m in result["models"]]
    secs = [result["results"][m].get("sections") for m in models]
    if not any(secs):
        return ('<p class="na">No section mapping applies: the subsets are not RewardBench subsets. Pass '
                '<code>--sections FILE.json</code> with <code>{"Section": ["subset or dataset name", ...]}</code> '
                'to group subsets (or whole data files) into sections.</p>')
    s0 = next(s for s in secs if s)
    out = ['<p class="how">Section score = accuracy over the section\'s pairs, i.e. its subsets weighted by their '
           'number of pairs; overall = the mean of the section scores. Subsets the mapping names that have no pairs here '
           'are listed as missing. (The RewardBench leaderboard additionally re-weights math vs code inside Reasoning.)</p>']
    head = "<tr><th class=l>section</th><th>pairs</th>" + "".join(f"<th>score<br><span class=muted>{_e(m)}</span></th>" for m in models) + "<th class=l>subsets present</th><th class=l>missing (no pairs)</th></tr>"
    body = []
    for name, v in s0["sections"].items():
        scores = "".join(f"<td>{_pct(s['sections'][name]['score']) if s else '–'}</td>" for s in secs)
        body.append(f"<tr><td class=l>{_e(name)}</td><td>{v['n']}</td>{scores}<td class=l>{_e(', '.join(v['subsets']))}</td>"
                    f"<td class='l muted'>{_e(', '.join(v['missing'])) or '–'}</td></tr>")
    overall = "".join(f"<td>{_pct(s['overall']) if s else '–'}</td>" for s in secs)
    body.append(f"<tr class=total><td class=l>overall</td><td></td>{overall}<td></td><td></td></tr>")
    out.append(f"<table>{head}{''.join(body)}</table>")
    if s0.get("unmapped"):
        out.append(f'<p class="how">Not in any section: {_e(", ".join(s0["unmapped"]))}.</p>')
    return "\n".join(out)


def _pair_datasets(result) -> list[str]:
    m0 = result["models"][0]["name"]
    names = [d["name"] for d in result["datasets"] if result["results"][m0]["datasets"].get(d["name"], {}).get("kind") == "pairs"]
    return names


def _calibration_section(result, evals, figs) -> str:
    models = [m["name"] for m in result["models"]]
    names = _pair_datasets(result)
    if not names:
        return '<p class="na">No preference-pair data.</p>'
    out = ['<p class="how">The model\'s probability that the chosen response wins is P = sigmoid(r_chosen − r_rejected). '
           'Folded onto the favoured side, a calibrated model that says 80% is right 80% of the time (points on the diagonal). '
           'ECE = Σ_bins (n_bin/n)·|accuracy − confidence|. T is the temperature that minimises the log-loss of '
           'sigmoid(margin / T): T &gt; 1 means over-confident margins (divide them by T), T &lt; 1 under-confident; '
           '∞ means the margins point the wrong way on average (accuracy below chance), so only P = 0.5 is calibrated.</p>']
    head = "<tr><th class=l>dataset</th><th class=l>model</th><th>ECE</th><th>log-loss</th><th>temperature T</th><th>ECE after T</th><th>log-loss after T</th></tr>"
    body = []
    for n in names:
        for m in models:
            c = result["results"][m]["datasets"][n]["calibration"]
            t = "∞ <span class=muted>(wrong way)</span>" if c.get("temperature_note") else _num(c["temperature"], 2)
            body.append(f"<tr><td class=l>{_e(n)}</td><td class=l>{_e(m)}</td><td>{_num(c['ece'])}</td><td>{_num(c['nll'])}</td>"
                        f"<td title='{_e(c.get('temperature_note', ''))}'>{t}</td><td>{_num(c['ece_calibrated'])}</td><td>{_num(c['nll_calibrated'])}</td></tr>")
    out.append(f"<table>{head}{''.join(body)}</table>")
    for n in names:
        cals = [result["results"][m]["datasets"][n]["calibration"] for m in models]
        used = max(sum(1 for b in c.get("bins", []) if b["n"]) for c in cals)
        if used < 2:  # every margin in one confidence bin: a diagram of one point says nothing the table does not
            out.append(f"<h3>{_e(n)}</h3><p class='na'>Reliability diagram not drawn: every margin falls in one confidence "
                       "bin (rewards barely differ between the two sides), so it would be a single point.</p>")
            continue
        out.append(f"<h3>{_e(n)}</h3>" + figs.img(f"calibration_{n}", plots.reliability(cals, models), f"reliability diagram {n}"))
    return "\n".join(out)


def _uncertainty_section(result) -> str:
    models = [m["name"] for m in result["models"]]
    rows = [(n, m, result["results"][m]["datasets"][n].get("ensemble")) for n in _pair_datasets(result) for m in models]
    rows = [r for r in rows if r[2] and r[2].get("pairs")]
    if not rows:
        return '<p class="na">No ensemble among the models (train one with <code>model.ensemble_size=K</code>).</p>'
    out = ['<p class="how">An ensemble\'s K members each give a margin d_k = r_chosen − r_rejected; the pair\'s uncertainty '
           'is their standard deviation std_k(d_k) and its margin their mean. Pairs are cut into five equal-count bins by '
           'uncertainty (Q1 = the 20% least uncertain, Q5 = the 20% most uncertain), each with its accuracy and 95% Wilson '
           'interval: a useful uncertainty has Q5 well below Q1. AUROC: the probability that a wrong pair (mean margin ≤ 0) '
           'is more uncertain than a right one (0.5 = no signal), for the std, for the flip probability Φ(−|mean d| / std) '
           '(scale-free: the std grows with the margin) and, as the reference a single model already has, for the '
           'mean margin\'s smallness −|mean d|. ECE of P(chosen &gt; rejected) without the ensemble '
           '(member 0 alone, sigmoid(d_0)), of the mean reward (sigmoid(mean d)) and of the ensemble\'s probability '
           '(mean_k sigmoid(d_k)).</p>']
    head = ("<tr><th class=l>dataset</th><th class=l>model</th><th>K</th>" + "".join(f"<th>Q{q} accuracy</th>" for q in range(1, 6))
            + "<th>AUROC std→wrong</th><th>AUROC flip→wrong</th><th>AUROC −|d|→wrong</th><th>ECE member 0</th><th>ECE mean reward</th><th>ECE ensemble</th></tr>")
    body = []
    for n, m, e in rows:
        bins = "".join(f"<td>{_pct(b['accuracy'])} <span class=muted>{_ci(b)}</span></td>" for b in e["uncertainty_bins"])
        bins += "<td></td>" * (5 - len(e["uncertainty_bins"]))
        c = e["calibration"]
        body.append(f"<tr><td class=l>{_e(n)}</td><td class=l>{_e(m)}</td><td>{len(e['member_accuracy'])}</td>{bins}"
                    f"<td>{_num(e['auroc_std_wrong'])}</td><td>{_num(e.get('auroc_flip_wrong'))}</td>"
                    f"<td>{_num(e.get('auroc_margin_wrong'))}</td><td>{_num(c['member_0']['ece'])}</td>"
                    f"<td>{_num(c['mean_reward']['ece'])}</td><td>{_num(c['ensemble']['ece'])}</td></tr>")
    out.append(f"<table>{head}{''.join(body)}</table>")
    return "\n".join(out)


def _length_section(result, evals, figs) -> str:
    models = [m["name"] for m in result["models"]]
    names = _pair_datasets(result)
    if not names:
        return '<p class="na">No preference-pair data.</p>'
    unit = result.get("length_unit", "tokens")
    out = [f'<p class="how">Length = {unit} of the rendered response. A length-biased model is accurate when the chosen '
           'response is the longer one and inaccurate when it is the shorter one, and its reward correlates with length. '
           'Compare with the "pick the longer response" baseline on the same pairs.</p>']
    head = ("<tr><th class=l>dataset</th><th class=l>model</th><th>accuracy</th><th>longer baseline</th><th>chosen is longer</th>"
            "<th>acc. | chosen longer</th><th>acc. | rejected longer</th><th>acc. | same length</th><th>corr(reward, length)</th>"
            "<th>Spearman</th><th>corr(margin, Δlength)</th></tr>")
    body = []
    for n in names:
        for m in models:
            d = result["results"][m]["datasets"][n]
            lb = d["length"]
            s = lb.get("by_longer_side", {})
            cell = lambda k: f"{_pct(s.get(k, {}).get('accuracy'))} <span class=muted>({s.get(k, {}).get('n', 0)})</span>"  # noqa: E731
            body.append(f"<tr><td class=l>{_e(n)}</td><td class=l>{_e(m)}</td><td>{_pct(d['overall']['accuracy'])}</td>"
                        f"<td>{_pct(lb['longer_baseline'])}</td><td>{_pct(lb['chosen_longer_fraction'])}</td>"
                        f"<td>{cell('chosen_longer')}</td><td>{cell('rejected_longer')}</td><td>{cell('same_length')}</td>"
                        f"<td>{_num(lb['reward_length_pearson'], 2)}</td><td>{_num(lb['reward_length_spearman'], 2)}</td>"
                        f"<td>{_num(lb['margin_length_pearson'], 2)}</td></tr>")
    out.append(f"<table>{head}{''.join(body)}</table>")
    for n in names:
        per = [result["results"][m]["datasets"][n]["length"] for m in models]
        ps = evals[0].raw.get(n)
        scatter = (ps.chosen, ps.rejected, ps.len_chosen, ps.len_rejected) if ps is not None else None
        out.append(f"<h3>{_e(n)}</h3>" + figs.img(f"length_{n}", plots.length_bias(per, scatter, models, unit), f"length bias {n}"))
    return "\n".join(out)


def _distributions_section(result, evals, figs) -> str:
    models = [m["name"] for m in result["models"]]
    names = _pair_datasets(result)
    if not names:
        return '<p class="na">No preference-pair data.</p>'
    out = ['<p class="how">Rewards of chosen (green) and rejected (red) responses, and the margin r_chosen − r_rejected of '
           'each pair: mass right of 0 is correct. Well-separated histograms mean confident, correct ranking.</p>']
    head = "<tr><th class=l>dataset</th><th class=l>model</th><th>chosen mean ± std</th><th>rejected mean ± std</th><th>margin mean</th><th>margin median</th><th>margin std</th><th>BT loss</th></tr>"
    body = []
    for n in names:
        for m in models:
            r = result["results"][m]["datasets"][n]["rewards"]
            if not r.get("n"):
                continue
            body.append(f"<tr><td class=l>{_e(n)}</td><td class=l>{_e(m)}</td><td>{r['chosen_mean']:.3f} ± {r['chosen_std']:.3f}</td>"
                        f"<td>{r['rejected_mean']:.3f} ± {r['rejected_std']:.3f}</td><td>{_num(r['margin_mean'])}</td>"
                        f"<td>{_num(r['margin_median'])}</td><td>{_num(r['margin_std'])}</td><td>{_num(r['bt_loss'])}</td></tr>")
    out.append(f"<table>{head}{''.join(body)}</table>")
    for n in names:
        per = [(e.raw[n].chosen, e.raw[n].rejected) for e in evals if n in e.raw]
        out.append(f"<h3>{_e(n)}</h3>" + figs.img(f"distributions_{n}", plots.distributions(per, models), f"reward distributions {n}"))
    return "\n".join(out)


def _strength_section(result, evals, figs) -> str:
    models = [m["name"] for m in result["models"]]
    names = [n for n in _pair_datasets(result) if result["results"][models[0]]["datasets"][n].get("strength")]
    if not names:
        return ('<p class="na">No preference-strength field in the pair data (looked for "margin", "preference_strength", '
                '"strength", "score_diff", "agreement"; choose one with <code>--strength-field</code>).</p>')
    out = ['<p class="how">Accuracy per level of the pairs\' preference strength: a good model is most accurate on '
           'clear-cut preferences. Many distinct values are grouped into quantile bins.</p>']
    for n in names:
        st = [result["results"][m]["datasets"][n]["strength"] for m in models]
        field = st[0]["field"]
        head = "<tr><th class=l>level</th><th>pairs</th>" + "".join(f"<th>accuracy<br><span class=muted>{_e(m)}</span></th><th>95% CI</th>" for m in models) + "</tr>"
        body = []
        for i, lv in enumerate(st[0]["levels"]):
            cells = "".join(f"<td>{_pct(s['levels'][i]['accuracy'])}</td><td class=muted>{_ci(s['levels'][i])}</td>" for s in st)
            body.append(f"<tr><td class=l>{_e(lv['label'])}</td><td>{lv['n']}</td>{cells}</tr>")
        out.append(f"<h3>{_e(n)} <span class=tag>{_e(field)}</span></h3><table>{head}{''.join(body)}</table>")
        if st[0]["levels"]:
            out.append(figs.img(f"strength_{n}", plots.strength([s["levels"] for s in st], models, field), f"accuracy by strength {n}"))
    return "\n".join(out)


def _bon_section(result) -> str:
    models = [m["name"] for m in result["models"]]
    res = result["results"]
    names = [d["name"] for d in result["datasets"] if res[models[0]]["datasets"].get(d["name"], {}).get("kind") == "best_of_n"]
    if not names:
        return ('<p class="na">No best-of-N data. Rows <code>{"prompt": ..., "responses": [r0, r1, ...], "best": i}</code> '
                'are detected automatically.</p>')
    out = ['<p class="how">Top-1 accuracy: the fraction of prompts where the best response gets the highest reward (a tie '
           'for the top shares the credit). Random = mean of 1/K. Best vs rest: pairwise accuracy of the best response against '
           'each other response.</p>']
    head = "<tr><th class=l>dataset</th><th class=l>subset</th><th>prompts</th><th>mean K</th><th>random</th>" + "".join(
        f"<th>top-1<br><span class=muted>{_e(m)}</span></th><th>95% CI</th><th>best vs rest</th>" for m in models) + "</tr>"
    body = []
    for n in names:
        f0 = res[models[0]]["datasets"][n]
        groups = [("all", None)] + [(g, g) for g in f0.get("subsets", {})]
        for label, g in groups:
            stats = [res[m]["datasets"][n] if g is None else res[m]["datasets"][n]["subsets"][g] for m in models]
            s0 = stats[0]
            cells = "".join(f"<td>{_pct(s['top1'])}</td><td class=muted>{_ci(s)}</td><td>{_pct(s['best_vs_rest']['accuracy'])}</td>" for s in stats)
            body.append(f"<tr class='{'sub' if g else ''}'><td class=l>{_e(n if g is None else '')}</td><td class='l s'>{_e(label)}</td>"
                        f"<td>{s0['n']}</td><td>{_num(s0['mean_k'], 1)}</td><td>{_pct(s0['random_baseline'])}</td>{cells}</tr>")
    out.append(f"<table>{head}{''.join(body)}</table>")
    return "\n".join(out)


def _lists_section(result) -> str:
    models = [m["name"] for m in result["models"]]
    res = result["results"]
    names = [d["name"] for d in result["datasets"] if res[models[0]]["datasets"].get(d["name"], {}).get("kind") == "lists"]
    if not names:
        return ('<p class="na">No ranked lists. Rows <code>{"prompt": ..., "responses": [r0, r1, ...], "scores": [...]}</code> '
                'or <code>"ranking": [i, ...]</code> are detected automatically.</p>')
    out = ['<p class="how">Pairwise accuracy over every ordered pair of a list (score ties make no pair, reward ties count ½), '
           'top-1 (the highest-reward response has the best score; random = what a random pick gets), Kendall tau-b and NDCG '
           '(gains = score − the list\'s lowest score), each the mean over lists (formulas: <code>rewardforge.eval.metrics</code>).</p>']
    head = ("<tr><th class=l>dataset</th><th class=l>model</th><th>lists</th><th>pairs</th><th>pairwise accuracy</th><th>95% CI</th>"
            "<th>top-1</th><th>random</th><th>Kendall tau</th><th>NDCG</th></tr>")
    body = []
    for n in names:
        for m in models:
            f = res[m]["datasets"][n]
            body.append(f"<tr><td class=l>{_e(n)}</td><td class=l>{_e(m)}</td><td>{f['lists']}</td><td>{f['pairs']}</td>"
                        f"<td>{_pct(f['accuracy'])}</td><td class=muted>{_ci(f)}</td><td>{_pct(f['top1'])}</td>"
                        f"<td>{_pct(f.get('random_top1'))}</td><td>{_num(f['kendall_tau'], 3)}</td><td>{_num(f['ndcg'], 3)}</td></tr>")
    out.append(f"<table>{head}{''.join(body)}</table>")
    return "\n".join(out)


def _regression_section(result, evals, figs) -> str:
    models = [m["name"] for m in result["models"]]
    res = result["results"]
    names = [d["name"] for d in result["datasets"] if res[models[0]]["datasets"].get(d["name"], {}).get("kind") == "rated"]
    if not names:
        return '<p class="na">No rated (regression) data; rated rows need a regression model with matching attributes.</p>'
    out = ['<p class="how">Per attribute, over the rows where that label is present: MSE = mean((pred − true)²), '
           'MAE = mean(|pred − true|), Pearson (linear) and Spearman (rank) correlation of prediction with label. '
           'A prediction std far below the label std means the model mostly predicts the mean.</p>']
    head = "<tr><th class=l>dataset</th><th class=l>model</th><th class=l>attribute</th><th>n</th><th>MSE</th><th>MAE</th><th>Pearson</th><th>Spearman</th><th>label mean ± std</th><th>pred. mean ± std</th></tr>"
    body = []
    for n in names:
        for m in models:
            for a, st in res[m]["datasets"][n]["attributes"].items():
                body.append(f"<tr><td class=l>{_e(n)}</td><td class=l>{_e(m)}</td><td class=l>{_e(a)}</td><td>{st['n']}</td>"
                            f"<td>{_num(st['mse'])}</td><td>{_num(st['mae'])}</td><td>{_num(st['pearson'])}</td><td>{_num(st['spearman'])}</td>"
                            f"<td>{_num(st.get('label_mean'))} ± {_num(st.get('label_std'))}</td>"
                            f"<td>{_num(st.get('pred_mean'))} ± {_num(st.get('pred_std'))}</td></tr>")
    out.append(f"<table>{head}{''.join(body)}</table>")
    for n in names:
        for e in evals:
            rs = e.raw.get(n)
            if rs is None or not len(rs.labels):
                continue
            pred = rs.pred
            out.append(f"<h3>{_e(n)} — {_e(e.name)}</h3>" + figs.img(
                f"regression_{e.name}_{n}", plots.regression_scatter(pred, rs.labels, rs.attributes, res[e.name]["datasets"][n]["attributes"],
                                                                     f"{e.name} on {n}: predicted vs true"), f"predicted vs true {n}"))
    return "\n".join(out)


def _example(ex: dict[str, Any], header: str) -> str:
    def block(k: str, keep_end: bool = False) -> str:
        t = ex.get(k, "")
        if len(t) <= 300:
            return f"<div><b>{k}</b><pre>{_e(t)}</pre></div>"
        short = "… " + t[-300:] if keep_end else t[:300] + " …"  # a long prompt ends where the response starts
        return f"<div><b>{k}</b><pre>{_e(short)}</pre><details><summary>full {k} ({len(t)} chars)</summary><pre>{_e(t)}</pre></details></div>"

    return (f'<div class="ex"><div class="hd">{header}</div>{block("prompt", keep_end=True)}'
            f'<div class="two">{block("chosen")}{block("rejected")}</div></div>')


def _comparison_section(result, evals, figs) -> str:
    cmp = result.get("comparison")
    if not cmp:
        return ('<p class="na">One model evaluated. Pass two or more model directories to compare checkpoints side by side '
                '(accuracy table above, agreement, and the pairs where they disagree most).</p>')
    ref = cmp["reference"]
    out = [f'<p class="how">Each model against <b>{_e(ref)}</b> on the same pairs. "Only A right" / "only B right" count '
           'pairs exactly one of them gets right; McNemar\'s exact test says whether that difference could be chance '
           '(p &lt; 0.05: probably real). Disagreements are ranked by the difference of standardised margins '
           '(margin / reward std), so the top ones are where the models most confidently disagree.</p>']
    head = ("<tr><th class=l>dataset</th><th class=l>model B</th><th>pairs</th><th>accuracy A</th><th>accuracy B</th><th>B − A</th>"
            "<th>agreement</th><th>only A right</th><th>only B right</th><th>both right</th><th>both wrong</th><th>McNemar p</th></tr>")
    body = []
    for other, per in cmp["against"].items():
        for n, c in per.items():
            acc_a = result["results"][ref]["datasets"][n]["overall"]["accuracy"]
            acc_b = result["results"][other]["datasets"][n]["overall"]["accuracy"]
            delta = None if acc_a is None or acc_b is None else acc_b - acc_a
            dcls = "" if not delta else ("good" if delta > 0 else "bad")
            body.append(f"<tr><td class=l>{_e(n)}</td><td class=l>{_e(other)}</td><td>{c['n']}</td><td>{_pct(acc_a)}</td><td>{_pct(acc_b)}</td>"
                        f"<td class='{dcls}'>{'–' if delta is None else f'{100 * delta:+.1f} pts'}</td><td>{_pct(c['agreement'])}</td>"
                        f"<td>{c['a_only']}</td><td>{c['b_only']}</td><td>{c['both']}</td><td>{c['neither']}</td><td>{_pval(c['mcnemar_p'])}</td></tr>")
    out.append(f"<p>A = <b>{_e(ref)}</b></p><table>{head}{''.join(body)}</table>")
    by = {e.name: e for e in evals}
    for other, per in cmp["against"].items():
        for n, c in per.items():
            a, b = by[ref].raw.get(n), by[other].raw.get(n)
            if a is None or b is None or not len(a.chosen):
                continue
            da, db = a.chosen - a.rejected, b.chosen - b.rejected
            sa = np.concatenate([a.chosen, a.rejected]).std() or 1.0
            sb = np.concatenate([b.chosen, b.rejected]).std() or 1.0
            out.append(f"<h3>{_e(n)}: {_e(ref)} vs {_e(other)}</h3>")
            out.append(figs.img(f"compare_{other}_{n}", plots.comparison_scatter(da / sa, db / sb, ref, other, n), f"margins {ref} vs {other}"))
            if c["disagreements"]:
                shown = 3
                out.append(f"<p><b>The pairs where they disagree most</b> ({len(c['disagreements'])} listed)</p>")
                for i, ex in enumerate(c["disagreements"]):
                    if i == shown:
                        out.append(f"<details><summary>{len(c['disagreements']) - shown} more</summary>")
                    right = ref if ex["margin_a"] > 0 else other
                    hdr = (f"{_e(ex['where'])}{_tag(ex['subset'])} — margin A {ex['margin_a']:+.3f} (z {ex['z_a']:+.2f}), "
                           f"B {ex['margin_b']:+.3f} (z {ex['z_b']:+.2f}); right: <b>{_e(right)}</b>")
                    out.append(_example(ex, hdr))
                if len(c["disagreements"]) > shown:
                    out.append("</details>")
    return "\n".join(out)


def _mistakes_section(result) -> str:
    models = [m["name"] for m in result["models"]]
    names = _pair_datasets(result)
    if not names:
        return '<p class="na">No preference-pair data.</p>'
    out = ['<p class="how">The pairs each model gets wrong with the largest margin for the rejected response: worth reading '
           'to find label noise or a systematic blind spot.</p>']
    any_ = False
    for m in models:
        for n in names:
            mist = result["results"][m]["datasets"][n].get("worst_mistakes") or []
            if not mist:
                continue
            any_ = True
            out.append(f"<details><summary>{_e(m)} on {_e(n)}: the {len(mist)} most confident mistake{'s' if len(mist) > 1 else ''}</summary>")
            for ex in mist:
                out.append(_example(ex, f"{_e(ex['where'])}{_tag(ex['subset'])} — margin {ex['margin']:+.3f}, "
                                        f"P(chosen wins) = {ex['p_chosen']:.3f}"))
            out.append("</details>")
    if not any_:
        out.append('<p class="na">No wrongly ranked pairs.</p>')
    return "\n".join(out)


def _data_section(result) -> str:
    head = "<tr><th class=l>dataset</th><th class=l>file</th><th class=l>kind</th><th class=l>format</th><th>rows read</th><th>examples</th><th>bad rows skipped</th><th class=l>excluded</th><th>truncated seqs</th></tr>"
    m0 = result["models"][0]["name"]
    body = []
    for d in result["datasets"]:
        r = result["results"][m0]["datasets"].get(d["name"], {})
        exc = ", ".join(f"{k}: {v}" for k, v in d["excluded"].items()) or "–"
        body.append(f"<tr><td class=l>{_e(d['name'])}</td><td class='l muted'>{_e(d['path'])}</td><td class=l>{_e(d['kind'])}</td>"
                    f"<td class=l>{_e(d['format'])}</td><td>{d['rows_read']}</td><td>{d['examples']}</td><td>{d['skipped_bad_rows']}</td>"
                    f"<td class=l>{_e(exc)}</td><td>{r.get('truncated_sequences', '–')}</td></tr>")
    out = [f"<table>{head}{''.join(body)}</table>"]
    msgs = [m for d in result["datasets"] for m in d.get("bad_row_messages", [])]
    if msgs:
        out.append("<details><summary>first skipped rows</summary><pre>" + _e("\n".join(msgs[:10])) + "</pre></details>")
    mh = "<tr><th class=l>model</th><th class=l>type</th><th class=l>base model</th><th class=l>attributes</th><th>max length</th><th class=l>path</th><th>seconds</th></tr>"
    mb = "".join(f"<tr><td class=l>{_e(m['name'])}</td><td class=l>{_e(m['reward_model_type'])}</td><td class=l>{_e(m.get('base_model') or '')}</td>"
                 f"<td class=l>{_e(', '.join(m['attributes']) or '–')}</td><td>{m.get('max_length')}</td><td class='l muted'>{_e(m['path'])}</td>"
                 f"<td>{m.get('seconds')}</td></tr>" for m in result["models"])
    out.append(f"<h3>Models</h3><table>{mh}{mb}</table>")
    out.append(f'<p class="how">Length unit: {_e(result.get("length_unit"))} of the rendered response. Pairs whose two responses are '
               'identical are excluded (counted above). Sequences longer than the model\'s max length are truncated as in training '
               '(never dropped). Full numbers: <code>metrics.json</code>.</p>')
    return "\n".join(out)


def render_html(result: dict[str, Any], evals: Sequence[Any], figs: _Figures) -> str:
    models = [m["name"] for m in result["models"]]
    parts = {
        "accuracy": _accuracy_section(result, evals, figs),
        "sections": _sections_section(result),
        "calibration": _calibration_section(result, evals, figs),
        "uncertainty": _uncertainty_section(result),
        "length": _length_section(result, evals, figs),
        "distributions": _distributions_section(result, evals, figs),
        "strength": _strength_section(result, evals, figs),
        "best-of-n": _bon_section(result),
        "lists": _lists_section(result),
        "regression": _regression_section(result, evals, figs),
        "comparison": _comparison_section(result, evals, figs),
        "mistakes": _mistakes_section(result),
        "data": _data_section(result),
    }
    kinds = {v.get("kind") for r in result["results"].values() for v in r["datasets"].values()}
    has_pairs = "pairs" in kinds
    applies = {
        "accuracy": has_pairs or "empty" in kinds,
        "sections": any(r.get("sections") for r in result["results"].values()),
        "calibration": has_pairs, "length": has_pairs,
        "uncertainty": any((v.get("ensemble") or {}).get("pairs") for r in result["results"].values() for v in r["datasets"].values()), "distributions": has_pairs, "mistakes": has_pairs,
        "strength": any(v.get("strength") for r in result["results"].values() for v in r["datasets"].values()),
        "best-of-n": "best_of_n" in kinds,
        "lists": "lists" in kinds,
        "regression": "rated" in kinds,
        "comparison": len(models) > 1,
        "data": True,
    }
    shown = [(sid, t) for sid, t in SECTION_TITLES if applies[sid]]
    skipped = [(sid, t) for sid, t in SECTION_TITLES if not applies[sid]]
    nav = "".join(f'<a href="#{sid}">{_e(t)}</a>' for sid, t in shown) + ('<a href="#not-measured">Not measured</a>' if skipped else "")
    body = "".join(f'<section id="{sid}"><h2>{_e(t)}</h2>{parts[sid]}</section>' for sid, t in shown)
    if skipped:  # what these data or models cannot show, and how to get it, in one compact block
        body += ('<div id="not-measured"><h2>Not measured</h2>'
                 + "".join(f'<section id="{sid}" class="skip"><b>{_e(t)}</b>{parts[sid]}</section>' for sid, t in skipped) + "</div>")
    warnings = []
    for model, r in result["results"].items():
        for name, d in r["datasets"].items():
            o = d.get("training_overlap")
            if o and o["in_training"]:
                seen, unseen = o["accuracy_in_training"], o["accuracy_unseen"]
                warnings.append(f"{o['in_training']} of {o['pairs']} pairs of {name} ({o['share_in_training']:.1%}) have a prompt "
                                f"{model} was trained on: accuracy {seen['accuracy']:.4f} on those"
                                + (f", {unseen['accuracy']:.4f} on the {unseen['n']} unseen" if unseen else ""))
    if warnings:
        body = ('<div class="warn" style="border:2px solid #c33;padding:.5em 1em;margin:1em 0"><b>Training data in the '
                'evaluation.</b> ' + "<br>".join(_e(w) for w in warnings) + "</div>") + body
    title = "Reward model evaluation: " + ", ".join(models)
    meta = (f"Models: <b>{_e(', '.join(models))}</b><br>Data: {_e(', '.join(d['name'] for d in result['datasets']))}<br>"
            f"rewardforge {_e(result.get('rewardforge_version'))} · {_e(result.get('created'))} · {result.get('seconds')} s")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main><h1>Reward model evaluation</h1>"
            f"<div class=meta>{meta}</div><nav>{nav}</nav>{body}</main></body></html>\n")


def write_report(result: dict[str, Any], evals: Sequence[Any], datasets: Sequence[Any], out: str | Path) -> Path:
    """Write ``out/report.html`` and ``out/plots/*.png``; record the figure files in ``result['plots']``."""
    out = Path(out)
    figs = _Figures(out)
    page = render_html(result, evals, figs)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    result["plots"] = figs.files
    return path
