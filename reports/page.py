"""Self-contained HTML pages: one per experiment, and an index comparing them (inline CSS, relative images)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import PurePosixPath
from typing import Any

from matplotlib.colors import to_hex

from reports.data import ExperimentData, interpolation_curve, linear_barrier, pac_bayes_text, value_at
from reports.style import VECTOR_FORMAT, client_colour, vector_path

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap;
         font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; } .vector { font-size: 0.85em; } .live { color: #0a5; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; max-width: 900px; }
.pending { color: #555; font-style: italic; }
.skipped { color: #8a5a00; background: #fff7e0; padding: 0.4em 0.8em; border-left: 3px solid #e0a800; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.3em; vertical-align: middle; }
.failed { color: #a00; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


@dataclass(frozen=True)
class FigureEntry:
    """A figure of a page: written (``file_name`` relative to the page), skipped (``reason``) or ``pending``."""

    title: str
    caption: str
    file_name: str | None
    reason: str | None = None
    pending: bool = False  # not drawn yet (a live render draws it after the quick parts), rather than skipped
    vector: bool = True  # its vector copy is beside it (a live render writes PNGs only)


#: Seconds between reloads of a page whose experiment is still running.
REFRESH_S = 10


def _document(title: str, body: str, refresh_s: int | None = None) -> str:
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<link rel="icon" href="data:,">'  # no favicon request: a browser reports none missing
        f"{refresh}<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _number(value: float | None, decimals: int = 4, sign: bool = False) -> str:
    """Fixed decimals, one format per column; a dash where the value is absent."""
    if value is None:
        return "—"
    return f"{value:+.{decimals}f}" if sign else f"{value:.{decimals}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    def cell(tag: str, position: int, content: str) -> str:
        kind = ' class="text"' if position < text_columns else ""
        return f"<{tag}{kind}>{content}</{tag}>"

    head = "".join(cell("th", p, escape(h)) for p, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", p, c) for p, c in enumerate(row)) + "</tr>\n" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>\n{body}</table></div>'


def _figures(entries: Sequence[FigureEntry]) -> str:
    parts = []
    for entry in entries:
        parts.append(f"<h2>{escape(entry.title)}</h2>")
        if entry.file_name is None and entry.pending:
            parts.append(f'<p class="pending">Not drawn yet: {escape(entry.reason or "")}.</p>')
        elif entry.file_name is None:
            parts.append(f'<p class="skipped">Skipped: {escape(entry.reason or "no data")}.</p>')
        else:
            vector = escape(vector_path(PurePosixPath(entry.file_name)).as_posix())
            link = f' <a class="vector" href="{vector}">[{VECTOR_FORMAT.upper()}]</a>' if entry.vector else ""
            caption = f"<figcaption>{escape(entry.caption)}{link}</figcaption>"
            parts.append(f'<figure><img src="{escape(entry.file_name)}" alt="{escape(entry.title)}">{caption}</figure>')
    return "\n".join(parts)


def _client_label(data: ExperimentData, client_index: int) -> str:
    colour = to_hex(client_colour(client_index, data.num_clients))
    return f'<span class="swatch" style="background:{colour}"></span>client {client_index}'


def _last_with(data: ExperimentData, key: str) -> int | None:
    rounds = [d["round"] for d in data.client_stats if isinstance(d.get(key), dict)]
    return max(rounds) if rounds else None


def _summary(data: ExperimentData) -> str:
    if not data.rounds and not data.client_stats:
        return "<p>No round has been completed.</p>"
    parts = []
    if data.rounds:
        last = data.rounds[-1]
        parts.append(
            f"<p>Round {last['round']} of {data.planned_rounds}: global model on the full test split, "
            f"accuracy <b>{_number(value_at(last, ('test_accuracy',)))}</b>, "
            f"loss <b>{_number(value_at(last, ('test_loss',)))}</b>.</p>"
        )
    stats_round = max(d["round"] for d in data.client_stats) if data.client_stats else None
    landscape_round = _last_with(data, "landscape")
    landscape_stats = {d["client_index"]: d for d in data.stats_of(landscape_round)} if landscape_round else {}
    round_doc = next((r for r in data.rounds if r["round"] == landscape_round), {})
    rows = []
    for doc in data.stats_of(stats_round) if stats_round is not None else []:
        i = doc["client_index"]
        measured = landscape_stats.get(i, {})
        row = [
            _client_label(data, i),
            _number(value_at(doc, ("global", "test_accuracy"))),
            _number(value_at(doc, ("global", "test_loss"))),
            _number(value_at(doc, ("local", "test_accuracy"))),
            _number(value_at(doc, ("local", "test_loss"))),
        ]
        if landscape_round is not None:
            curve = interpolation_curve(measured)
            row += [
                _eigenvalue(measured, "local"),
                _eigenvalue(measured, "global"),
                _with_error(value_at(measured, ("landscape", "local", "trace")),
                            value_at(measured, ("landscape", "local", "trace_stderr")), 2),
                escape(pac_bayes_text(measured, ("landscape", "local", "generalization", "pac_bayes"))),
                _number(linear_barrier(*curve) if curve is not None else None, 4),
                _number(_entry(round_doc, "client_alignment", i, "cosine"), 4, sign=True),
                _number(_entry(round_doc, "leave_one_out", i, "delta_test_accuracy"), 4, sign=True),
            ]
        rows.append(row)
    header = ["client", "received acc.", "received loss", "local acc.", "local loss"]
    note = ("received: the global model the client started the round from; local: its model after training; "
            "both on the client's test data")
    if landscape_round is not None:
        header += ["λ1 local", "λ1 received", "trace local", "PAC-Bayes σ local", "barrier", "alignment",
                   "LOO Δ acc."]
        parts.append(
            f"<p>Clients in round {stats_round} ({note}); landscape columns from round {landscape_round}, the last "
            "measured (train subset; barrier: the largest height of the global → local loss path above the straight line between its endpoint losses). "
            "λ1 marked “not converged” when its eigenvalue search stopped first; trace ± its standard error; "
            "PAC-Bayes σ with its 95% interval, or “saturated” when the 0-1 error could not be shown to rise "
            f"by the deviation at any noise scale tried (no number is then meaningful).{_member_pac_bayes_note(data)}</p>"
        )
    else:
        parts.append(f"<p>Clients in round {stats_round} ({note}).</p>")
    parts.append(_table(header, rows))
    return "\n".join(parts)


def _member_pac_bayes_note(data: ExperimentData) -> str:
    """Why the members' PAC-Bayes column is empty, when the spec left it out."""
    if (data.spec.get("landscape") or {}).get("member_pac_bayes") is not False:
        return ""
    return (" The members' PAC-Bayes σ was not measured (landscape.member_pac_bayes is false: the landscape budget "
            "leaves it out when it would cut the measured rounds by more than half); the global model's is.")


def _eigenvalue(measured: dict[str, Any], model: str) -> str:
    text = _number(value_at(measured, ("landscape", model, "top_eigenvalues", 0)), 2)
    converged = ((measured.get("landscape") or {}).get(model) or {}).get("top_eigenvalues_converged")
    return text + " (not converged)" if converged is False else text


def _with_error(value: float | None, error: float | None, decimals: int) -> str:
    return _number(value, decimals) + ("" if value is None or error is None else f" ± {_number(error, decimals)}")


def _entry(round_doc: dict[str, Any], key: str, client_index: int, field: str) -> float | None:
    for entry in (round_doc.get("landscape") or {}).get(key) or []:
        if isinstance(entry, dict) and entry.get("client_index") == client_index:
            return value_at(entry, (field,))
    return None


def pretty_json(value: Any, level: int = 0) -> str:
    """Indented JSON with lists of numbers kept on one line (the ratio tables stay readable)."""
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {pretty_json(v, level + 1)}" for k, v in sorted(value.items())]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
        return "[\n" + ",\n".join(f"{inner}{pretty_json(v, level + 1)}" for v in value) + f"\n{pad}]"
    return json.dumps(value, default=str)


def _partition_table(data: ExperimentData) -> str:
    if not data.clients:
        return "<p>No client partition stored.</p>"
    classes = max(len(c.class_counts) for c in data.clients)
    rows = [
        [_client_label(data, c.client_index), str(c.num_train), str(c.num_test), _number(c.gini_index, 3)]
        + [str(n) for n in c.class_counts] + [""] * (classes - len(c.class_counts))
        for c in data.clients
    ]
    header = ["client", "num_train", "num_test", "gini_index"] + [f"class {k}" for k in range(classes)]
    return "<p>Training samples per class (the test data take the same share of each class).</p>" + _table(header, rows)


def experiment_page(data: ExperimentData, figures: Sequence[FigureEntry], index_href: str) -> str:
    """The HTML of one experiment's page; it reloads itself while the experiment is queued or running."""
    status = escape(data.status)
    if data.error:
        status += f' — <span class="failed">{escape(str(data.error))}</span>'
    live = (f' <span class="live">(live: this page reloads every {REFRESH_S} s while the experiment runs)</span>'
            if data.running else "")
    body = "\n".join([
        f'<p><a href="{escape(index_href)}">← all experiments</a></p>',
        f"<h1>{escape(data.label)}</h1>",
        f"<p>Experiment <code>{escape(data.experiment_id)}</code>, status {status}{live}; "
        f"{len(data.rounds)} of {data.planned_rounds} rounds aggregated, {data.num_clients} clients.</p>",
        "<h2>Final round</h2>" if not data.running else "<h2>Latest round</h2>",
        _summary(data),
        "<h2>Partition</h2>",
        _partition_table(data),
        _figures(figures),
        "<h2>Spec</h2>",
        f"<pre>{escape(pretty_json(data.spec))}</pre>",
    ])
    return _document(f"fedland: {data.label}", body, REFRESH_S if data.running else None)


def experiment_summary(data: ExperimentData, href: str) -> dict[str, Any]:
    """The index row of an experiment, as JSON-able values (kept beside its page, so later indexes list it)."""
    last = data.rounds[-1] if data.rounds else {}
    return {
        "experiment_id": data.experiment_id, "label": data.label, "href": href, "status": data.status,
        "rounds": len(data.rounds), "planned_rounds": data.planned_rounds, "num_clients": data.num_clients,
        "test_accuracy": value_at(last, ("test_accuracy",)), "test_loss": value_at(last, ("test_loss",)),
        "landscape": "yes" if data.has_landscape else ("disabled" if not data.landscape_enabled else "none stored"),
        "created_at": data.spec.get("timestamp"),
    }


def index_page(experiments: Sequence[Mapping[str, Any]], figures: Sequence[FigureEntry], compared: int,
               replicate_rows: Sequence[Sequence[str]] = (), replicate_header: Sequence[str] = ()) -> str:
    """The HTML of the index: a table linking every experiment page, the replicate groups, the comparison figures."""
    rows = []
    for row in experiments:
        rows.append([
            f'<a href="{escape(str(row["href"]))}">{escape(str(row["label"]))}</a>',
            f"<code>{escape(str(row['experiment_id']))}</code>",
            escape(str(row["status"])),
            f"{row['rounds']}/{row['planned_rounds']}",
            str(row["num_clients"]),
            _number(row.get("test_accuracy")),
            _number(row.get("test_loss")),
            escape(str(row.get("landscape"))),
        ])
    table = _table(
        ["experiment", "id", "status", "rounds", "clients", "final test acc.", "final test loss", "landscape"],
        rows, text_columns=3,
    ) if rows else "<p>No experiments to report.</p>"
    running = any(row["status"] in ("queued", "running") for row in experiments)
    body = "\n".join([
        "<h1>fedland experiments</h1>",
        f'<p class="live">Live: this page reloads every {REFRESH_S} s while an experiment runs.</p>' if running else "",
        table,
        ("<h2>Replicates across seeds</h2><p>Experiments that differ only in their seed, as one row: each value "
         "is the mean over the seeds ± the half width of its 95% Student-t interval (n: seeds with the value). "
         "A saturated PAC-Bayes search has no σ and is counted apart.</p>"
         + _table(replicate_header, [[escape(c) for c in row] for row in replicate_rows], text_columns=2))
        if replicate_rows else "",
        f"<p>Comparison of the {compared} experiments of the latest report: one line per experiment, labelled by "
        "description (replicates across seeds: one line, their mean, shaded by its 95% interval); "
        "each has its own colour, line style and marker, and points are offset horizontally by a few "
        "hundredths of a round so identical values stay visible. Every figure also as "
        f"{VECTOR_FORMAT.upper()}.</p>" if compared else "",
        _figures(figures),
    ])
    return _document("fedland experiments", body, REFRESH_S if running else None)
