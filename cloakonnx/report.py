"""Human-readable tables and JSON for every command's result."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import CloakError


STOPPED_BY = {"loss": "the training loss fell below --learn-stop-loss",
              "validation": "as many held-out samples survive the inner attack as were right before"}


def pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}%"


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, default=str)


def write_report(data: Any, path: str | Path) -> None:
    """Write JSON to ``path`` (atomically, like models)."""
    import os
    import tempfile

    p = Path(path)
    if not p.parent.is_dir():
        raise CloakError(f"report directory does not exist: {p.parent}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(to_json(data) + "\n")
        os.replace(tmp, p)
    except OSError as exc:
        raise CloakError(f"could not write report {p}: {exc.strerror or exc}") from exc


def table(rows: list[list[str]], header: list[str] | None = None) -> str:
    rows = ([header] if header else []) + rows
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(report: dict) -> str:
    """One plain sentence on what the mask buys, under the strongest threat model measured."""
    adv = report["adversarial_accuracy"]
    clean = report["clean_accuracy"]
    gain_t = adv["hardened_transfer"] - adv["original"]
    cost = clean["original"] - clean["hardened"]
    parts = [f"Transfer attacks (crafted on the original): {100 * gain_t:+.1f} points of adversarial accuracy"]
    if adv.get("hardened_adaptive") is not None:
        gain_a = adv["hardened_adaptive"] - adv["original"]
        parts.append(f"adaptive attacks (crafted on the hardened model): {100 * gain_a:+.1f} points")
    parts.append(f"clean-accuracy cost {100 * cost:+.1f} points")
    text = "; ".join(parts) + "."
    if gain_t <= 0:
        text += " The mask buys nothing against transfer attacks on this model and data."
    elif adv.get("hardened_adaptive") is not None and adv["hardened_adaptive"] <= adv["original"]:
        text += " An attacker who knows the mask gains it all back."
    return text


def _what_changed(report: dict) -> str:
    """The first line's subject: the mask (per tensor when several), or the fine-tuned weights."""
    learning = report.get("learning") or {}
    masks = report.get("masks") or []
    if learning.get("method") == "finetune":
        alpha = learning.get("alpha")
        moved = f"{learning['tensors']} weight tensors ({learning['params']})"
        return (f"fine-tuned {moved} at alpha {alpha:g}" if alpha is not None
                else f"fine-tuned {moved}, but no alpha beat the original: the model is unchanged")
    if len(masks) > 1:
        what = f"masked {report['masked']} of {report['features']} values in {len(masks)} tensors (" + ", ".join(
            f"{m['tensor']!r}: {m['zeroed']} of {m['width']}" + (f", {m['scaled']} scaled" if m["scaled"] else "")
            for m in masks) + ")"
    else:
        scaled = f", {masks[0]['scaled']} scaled" if masks and masks[0]["scaled"] else ""
        what = f"masked {report['masked']} of {report['features']} features of {report['feature_tensor']!r}{scaled}"
    return what


CANDIDATE_NAMES = {"mask": "learned masks", "finetune": "fine-tuned weights"}


def _candidates_line(learning: dict) -> str:
    """--method auto (harden's default) or both: which candidate was written, and why."""
    candidates = learning.get("candidates")
    if not candidates:
        return ""
    kept = learning.get("kept")
    figures = ", ".join(f"{CANDIDATE_NAMES[m]} {pct(c['guard']).strip()}" if c["written"] else
                        f"{CANDIDATE_NAMES[m]} no gain" for m, c in candidates.items())
    return (f"--method {learning.get('chooser', 'auto')}: {'kept the ' + CANDIDATE_NAMES[kept] if kept else 'neither beats the original'}; "
            f"worst case on validation: {figures}\n")


def _strength_line(learning: dict) -> str:
    """How strongly a learned change was applied, and the check against the original."""
    if "guard" not in learning and "alpha" not in learning and "strength" not in learning:
        return ""
    chosen = learning.get("alpha", learning.get("strength"))
    line = (f"strength {chosen:g} chosen" if chosen is not None else "no strength chosen")
    line += (f" on validation against the adaptive attacker, within a clean budget of "
             f"{learning.get('max_clean_drop', 0):g} points")
    guard = learning.get("guard")
    if guard:
        line += (f"; {guard['attack']}: original {pct(guard['original']).strip()}, hardened {pct(guard['hardened']).strip()}"
                 + ("" if chosen is not None else " (not above the original: nothing written)"))
    return line + "\n"


def format_harden(report: dict) -> str:
    a = report["attack"]
    adv = report["adversarial_accuracy"]
    clean = report["clean_accuracy"]
    what = _what_changed(report)
    learning = report.get("learning") or {}
    method = "method finetune" if learning.get("method") == "finetune" else f"score {report['score']}"
    seconds = f"; learned in {learning['seconds']:.1f} s" if learning else ""
    if learning.get("method") == "finetune" and "steps" in learning:
        rose = learning.get("lr_given_up") or []
        seconds += f", {learning['steps']} steps at step size {learning['lr']:g}" + (
            f", after the loss rose at {' and '.join(f'{lr:g}' for lr in rose)}" if rose else "") + (
            f" (stopped early: {STOPPED_BY[learning['stopped_by']]})" if learning.get("stopped_by") else "")
    head = (f"{report['model']} -> {report['output']}\n"
            f"{what} ({method}{seconds}); attack {a['name']} {a['norm']} eps={a['eps']:g}"
            + (f" steps={a['steps']}" if a["name"] != "fgsm" else "")
            + f"; {report['samples']['validation']} validation samples\n")
    strength = _strength_line(learning)
    if report.get("max_clean_drop") is not None and not strength:  # the strength line names the budget itself
        conf = report.get("budget_confidence")
        head += (f"chosen within a clean-accuracy budget of {report['max_clean_drop']:g} points on validation"
                 + (f" and for its {100 * conf:g}% upper bound on new data" if conf else "")
                 + ("" if report.get("mask_added", True) else ": no mask qualifies, the model is unchanged") + "\n")
    head += strength + _candidates_line(learning)
    if learning.get("bound_note"):
        head += f"note: {learning['bound_note']}\n"
    rows = [  # the adaptive attacker first: it is the threat that counts; transfer is the paper's setting
        ["clean", pct(clean["original"]), pct(clean["hardened"])],
        ["adversarial, adaptive (crafted on each model)", pct(adv["original"]), pct(adv.get("hardened_adaptive"))],
        ["adversarial, transfer (crafted on original)", pct(adv["original"]), pct(adv["hardened_transfer"])],
    ]
    return (head + table(rows, ["accuracy on validation", "original", "hardened"]) + "\n" + strength_curve(report)
            + verdict(report))


def strength_curve(report: dict) -> str:
    """The validation curve a learned change was chosen from: clean and adaptive accuracy per strength."""
    curve = report.get("curve") or []
    if not curve or "alpha" not in curve[0]:
        return ""
    chosen = (report.get("learning") or {}).get("strength", (report.get("learning") or {}).get("alpha"))
    rows = [[f"{p['alpha']:g}" + (" *" if chosen is not None and p["alpha"] == chosen and p["alpha"] else ""),
             pct(p["clean_accuracy"]), pct(p["adversarial_accuracy"]),
             "" if not p["alpha"] else f"{p['clean_drop_bound']:.2f}",
             "" if p.get("median_margin") is None else f"{p['median_margin']:.2f}"] for p in curve]
    return table(rows, ["strength (* chosen)", "clean", "adaptive", "drop bound", "margin"]) + "\n"


def format_comparison(reports: dict[str, dict]) -> str:
    """Several hardens of one model on the same validation samples, one row each: what each method buys.
    A run that chose between methods (--method auto or both) also shows the candidate it did not
    write (no transfer figures)."""
    rows = []
    for name, r in reports.items():
        adv, clean = r["adversarial_accuracy"], r["clean_accuracy"]
        learning = r.get("learning") or {}
        kept = learning.get("kept")
        for method, c in (learning.get("candidates") or {}).items():
            if method != kept:
                rows.append([f"  {CANDIDATE_NAMES[method]} (--method {method}): "
                             + ("not written" if c["written"] else "no gain"),
                             pct(c["clean_accuracy"]), pct(c["adversarial_accuracy"]), "-", ""])
        label = name + (f": {CANDIDATE_NAMES[kept]}" if kept else "") + (
            "" if r.get("mask_added", True) else " (no gain: unchanged)")
        rows.append([label, pct(clean["hardened"]), pct(adv.get("hardened_adaptive")), pct(adv["hardened_transfer"]),
                     f"{r['seconds']:.0f} s"])
    first = next(iter(reports.values()))
    rows.insert(0, ["original", pct(first["clean_accuracy"]["original"]),
                    pct(first["adversarial_accuracy"]["original"]), pct(first["adversarial_accuracy"]["original"]), ""])
    n = first["samples"]["validation"]
    return table(rows, [f"on the same {n} validation samples", "clean", "adaptive", "transfer", "harden"])


def format_inspect(info: dict) -> str:
    lines = [f"{info['path']}: IR {info['ir_version']}, opset {info['opset']}, {info['nodes']} nodes"
             + (f", producer {info['producer']}" if info["producer"] else "")]
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            shape = "[" + ", ".join("?" if d is None else str(d) for d in t["shape"]) + "]"
            given = (info.get("input_shapes") or {}).get(t["name"]) if kind == "inputs" else None
            lines.append(f"  {kind[:-1]:6} {t['name']}: {t['dtype']} {shape}"
                         + (f", run as [{', '.join(map(str, given))}] (--input-shapes)" if given is not None else ""))
    lines.append(f"  batch dimension: {'dynamic' if info['dynamic_batch'] else 'fixed'}")
    head = info["head"]
    if head:
        names = f" ({', '.join(n for n in head['nodes'] if n)})" if any(head["nodes"]) else ""
        lines.append(f"  head: {head['kind']}{names} -> {head['logits']}, "
                     f"{head['classes']} classes")
        lines.append(f"  feature tensor: {head['feature_tensor']} ({head['features']} features)")
        m = head["mask"]
        lines.append("  cloak mask: none" if m is None else
                     f"  cloak mask ({'folded into the head weights' if m['form'] == 'folded' else 'Mul node ' + m['node']}): "
                     f"zeroes {m['masked']} of {head['features']} features ({100 * m['fraction']:.1f}%)")
    else:
        lines.append(f"  head: not found: {info['head_error']}")
    masks = info.get("masks") or []
    if len(masks) > 1 or any(m["scaled"] for m in masks):
        lines.append(f"  cloak masks: {len(masks)}")
        for m in masks:
            where = "folded into the head weights" if m["form"] == "folded" else f"{m['tensor']} (Mul {m['node']})"
            scaled = f", scales {m['scaled']}" if m["scaled"] else ""
            lines.append(f"    {where}: zeroes {m['zeroed']} of {m['width']}{scaled}")
    meta = info["metadata"]
    for k, v in meta.items():
        if k.startswith("cloakonnx.") and k != "cloakonnx.history":
            lines.append(f"  {k}: {v if len(v) < 100 else v[:97] + '...'}")
    return "\n".join(lines)


def format_check(result: dict) -> str:
    shapes = ", ".join(f"{n} [{', '.join(map(str, s))}]" for n, s in (result.get("input_shapes") or {}).items())
    lines = [f"{result['model']}: batch {result['batch']}" + (f"; inputs {shapes}" if shapes else "")]
    if result.get("unsupported"):
        ops = ", ".join(f"{op} (opset {v})" for op, v in result["unsupported"])
        lines.append(f"  unsupported ops: {ops}")
    rows = [[o["name"], f"{o['max_abs']:.3g}", f"{o['max_rel']:.3g}", f"{o['tolerance']:.3g}", "ok" if o["ok"] else "MISMATCH"]
            for o in result.get("outputs", [])]
    if rows:
        lines.append(table(rows, ["output", "max abs diff", "max rel diff", "tolerance", ""]))
    if result.get("unsupported") or result.get("error"):
        lines.append("  input gradients: not computed (the executor cannot run this graph)")
    else:
        lines.append(f"  input gradients: {'finite' if result.get('grad_finite') else 'NOT finite'}, "
                     f"{'non-zero' if result.get('grad_nonzero') else 'ZERO'}")
    if result.get("computes_in_float32"):
        lines.append("  note: the model is fp16; the executor computes in float32 for gradients")
    q = result.get("quantized")
    if q:
        agree = q.get("fused_top1_agreement")
        lines.append(f"  note: QDQ-quantized; compared with {q['reference']}. onnxruntime's fused integer kernels "
                     f"differ from it by up to {q['fused_max_abs']:.3g}"
                     + (f" (top-1 agreement {100 * agree:.1f}%)" if agree is not None else "")
                     + "; gradients pass quantization straight through")
    lines.append("  result: " + ("OK" if result.get("ok") else "FAILED"))
    return "\n".join(lines)


def format_evaluate(report: dict) -> str:
    eps = report["eps"]
    head = (f"{report['model']}: {report['samples']} samples, {report['norm']} attacks"
            + (f", transfer from {report['reference']}" if report.get("reference") else "") + "\n")
    rows = [["clean", "", *[pct(report["clean_accuracy"])] * len(eps)]]
    series: dict[tuple[str, str], dict] = {}
    for r in report["results"]:
        series.setdefault((r["attack"], r["threat"]), {})[r["eps"]] = r["accuracy"]
    for (attack, threat), accs in series.items():
        rows.append([attack, threat, *[pct(accs.get(e)) for e in eps]])
    rows.append(["robust (worst case per sample)", "", *[pct(report["robust_accuracy"][repr(e)]) for e in eps]])
    text = head + table(rows, ["accuracy", "threat", *[f"eps={e:g}" for e in eps]])
    s = report.get("summary")
    if s:
        robust = ", ".join(f"{pct(s['robust_accuracy'][repr(e)]).strip()} at eps {e:g}" for e in s["eps"])
        text += (f"\nsummary: clean {pct(s['clean_accuracy']).strip()}, robust {robust} ({s['norm']}), n={s['n']}, "
                 f"attacks {', '.join(s['attacks'])}"
                 + ("; EVALUATION MAY BE UNRELIABLE (a check or an attack failed)" if s["unreliable"] else ""))
    for c in report["checks"]:
        text += f"\n{'ok  ' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail']}"
    for note in report.get("notes", []):
        text += f"\nnote: {note}"
    for fail in report.get("failures", []):
        at = f", eps={fail['eps']:g}" if fail["eps"] is not None else ""
        text += f"\nfailed: {fail['attack']} ({fail['threat']}{at}): {fail['error']}"
    return text


def format_sweep(report: dict) -> str:
    scores = list(report["curves"])
    head = (f"{report['model']}: {report['features']} features of {report['feature_tensor']!r}; attack "
            f"{report['attack']['name']} eps={report['attack']['eps']:g}; {report['samples']['validation']} validation "
            f"samples; original clean {pct(report['clean_accuracy'])}, adversarial {pct(report['adversarial_accuracy'])}\n")
    if report.get("strength"):
        return format_strength_sweep(report)
    by_frac: dict[int, dict] = {}
    for score in scores:
        for p in report["curves"][score]:
            by_frac.setdefault(p["masked"], {})[score] = p
    rows = []
    for masked in sorted(by_frac):
        pts = by_frac[masked]
        any_p = next(iter(pts.values()))
        row = [f"{100 * any_p['fraction']:.1f}%", str(masked)]
        for score in scores:
            p = pts.get(score)
            row += [pct(p["clean_accuracy"]) if p else "", pct(p["adversarial_accuracy"]) if p else ""]
        rows.append(row)
    header = ["masked", "n"] + [f"{h} ({s})" for s in scores for h in ("clean", "adv")]
    text = head + table(rows, header)
    conf = report.get("budget_confidence")
    text += (f"\nwithin a clean-accuracy budget of {report['max_clean_drop']:g} points"
             + (f" (and its {100 * conf:g}% upper bound on new data):" if conf else ":"))
    for score in scores:
        c = report["chosen"][score]
        text += (f"\n  {score}: " + ("no fraction improves adversarial accuracy" if c is None else
                 f"mask {c['masked']} ({100 * c['fraction']:.1f}%): clean {pct(c['clean_accuracy'])}, "
                 f"adversarial {pct(c['adversarial_accuracy'])}"
                 + (f", drop bound {c['clean_drop_bound']:.2f} pts" if conf and c.get("clean_drop_bound") is not None
                    else "")))
    b = report["best"]
    text += "\nbest: " + (f"{b['score']}" if b["score"] else "none: the mask buys nothing on this model and data")
    return text


def format_strength_sweep(report: dict) -> str:
    """sweep --method finetune: the validation curve of the fine-tuned weights against alpha."""
    s = report["strength"]
    head = (f"{report['model']}: fine-tuned weights ({s['params']}, learned in {s['learning_seconds']:.1f} s); attack "
            f"{report['attack']['name']} eps={report['attack']['eps']:g}, adaptive; {report['samples']['validation']} "
            f"validation samples\n")
    text = head + strength_curve({"curve": s["curve"], "learning": {"strength": s["chosen"]}})
    conf = report.get("budget_confidence")
    text += (f"within a clean-accuracy budget of {report['max_clean_drop']:g} points"
             + (f" (and its {100 * conf:g}% upper bound on new data)" if conf else "") + ": ")
    if s["chosen"] is None:
        return text + "no alpha beats the original; harden would write it unchanged"
    guard = s.get("guard") or {}
    return text + (f"alpha {s['chosen']:g}; {guard.get('attack', '')}: original {pct(guard.get('original')).strip()}, "
                   f"fine-tuned {pct(guard.get('hardened')).strip()}")
