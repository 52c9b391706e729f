"""How much the live tree view costs while a reply streams.

Streams a 5,000-token echo reply at full speed into an open :class:`TreeView` (its chat
selected, so every update is drawn) and, side by side in the same run, the same stream
with no view. Reports:

- widget messages sent per second of streaming (target <= 25), counted at the comm
  boundary, every message of the view included (labels, transcript, status...);
- bytes per streaming update, which must stay flat as the reply and the transcript grow;
- total time with the view / without (target <= 1.2x).

A full-speed echo reply lasts milliseconds, too short to show a rate, so a paced run
(the same reply at ~1,700 tokens/s, a few seconds long) measures messages per second,
into the chat whose transcript the full-speed runs made long.

    python bench/bench_widget.py            # writes bench/results/widget.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import comm
import ipywidgets
from comm.base_comm import BaseComm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package
from subchat_magics.backends.echo import EchoBackend  # noqa: E402
from subchat_magics import open_tree  # noqa: E402
from subchat_magics.tree import ChatTree  # noqa: E402
from subchat_magics.widget import TreeView, _chunk_html  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "widget.json"
REPLY_TOKENS = 5000
# the echo reply is "echo (N messages): <prompt>": three tokens, then the prompt's words
PROMPT = " ".join(f"word{i}" for i in range(REPLY_TOKENS - 3))
CHUNK_START = _chunk_html("")[:-len("</span>")]


class Wire:
    """What the view would put on the wire: each comm message serialised as a kernel
    does (JSON), with its time and size."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, int, str, bool]] = []
        self.lock = threading.Lock()
        wire = self

        class WireComm(BaseComm):
            def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
                size = len(json.dumps({"data": data or {}, "comm_id": self.comm_id,
                                       "msg_type": msg_type, **keys}))
                state = (data or {}).get("state", {})
                chunk = str(state.get("value", "")).startswith(CHUNK_START)
                with wire.lock:
                    wire.sent.append((time.perf_counter(), size, self.comm_id, chunk))

        comm.create_comm = lambda *a, **k: WireComm(*a, **k)

    def mark(self) -> int:
        return len(self.sent)


def is_stream_update(msg: tuple) -> bool:
    return msg[3]  # an update of a streaming chunk's HTML


def consume(tree: ChatTree, path: str, backend: EchoBackend) -> tuple[float, float, float]:
    """Send the prompt and read the reply to the end; (start, first token, end) times."""
    t0 = time.perf_counter()
    turn = tree.send(path, PROMPT, backend=backend, max_tokens=REPLY_TOKENS + 10)
    first = None
    for _ in turn:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert len(turn.parts) == REPLY_TOKENS, len(turn.parts)
    return t0, first or end, end


def max_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    return max((bisect.bisect_right(times, t + window) - i for i, t in enumerate(times)),
               default=0)


def quarters(values: list[int]) -> list[float]:
    n = len(values)
    return [round(statistics.fmean(values[i * n // 4:(i + 1) * n // 4]), 1)
            for i in range(4) if values[i * n // 4:(i + 1) * n // 4]]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=31, help="full-speed runs of each kind")
    ap.add_argument("--pace", type=float, default=0.0005,
                    help="seconds per token of the paced run (sleep granularity adds some)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    wire = Wire()
    work = Path(tempfile.mkdtemp(prefix="subchat-bench-"))
    plain_tree = open_tree(work / "plain.db")
    view_tree = open_tree(work / "view.db")
    fast = EchoBackend(delay=0.0)
    for tree in (plain_tree, view_tree):
        tree.create("root/bench")
    view = TreeView(view_tree)
    view.select("root/bench")
    opened = wire.mark()

    plain_times, view_times, drawn_times, per_run = [], [], [], []
    consume(plain_tree, "root/bench", fast)  # warm both paths (imports, caches)
    consume(view_tree, "root/bench", fast)
    for _ in range(args.runs):
        t0, _, t1 = consume(plain_tree, "root/bench", fast)
        plain_times.append(t1 - t0)
        before = len(view._msg_widgets)
        mark = wire.mark()
        t0, first, t1 = consume(view_tree, "root/bench", fast)
        view.sync()  # whatever the render thread has not drawn yet, drawn now
        t2 = time.perf_counter()
        view_times.append(t1 - t0)
        drawn_times.append(t2 - t0)
        sent = wire.sent[mark:]
        stream = [m for m in sent if is_stream_update(m)]
        per_run.append({
            "transcript_messages_before": before,
            "stream_s": round(t1 - first, 5),
            "widget_messages": len(sent),
            "stream_updates": len(stream),
            "stream_update_bytes": [m[1] for m in stream],
            "largest_message_bytes": max(m[1] for m in sent),
        })

    # paced: the same reply, a few seconds long, first into a new chat, then into the chat
    # the runs above made long (bytes per update must not grow with the transcript)
    paced_backend = EchoBackend(delay=args.pace)
    view_tree.create("root/fresh")
    view.select("root/fresh")
    mark = wire.mark()
    consume(view_tree, "root/fresh", paced_backend)
    view.sync()
    fresh_bytes = [m[1] for m in wire.sent[mark:] if is_stream_update(m)]
    view.select("root/bench")
    before = len(view._msg_widgets) + view._hidden
    mark = wire.mark()
    _, first, end = consume(view_tree, "root/bench", paced_backend)
    sent = wire.sent[mark:]
    stream = [m for m in sent if is_stream_update(m)]
    seconds = end - first
    stream_bytes = [m[1] for m in stream]
    view.close()
    plain_tree.close()
    view_tree.close()

    # paired: each view run against the plain run just before it (the machine's load drifts)
    ratio = statistics.median(v / p for v, p in zip(view_times, plain_times))
    drawn_ratio = statistics.median(d / p for d, p in zip(drawn_times, plain_times))
    result = {
        "command": "python bench/bench_widget.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "ipywidgets": ipywidgets.__version__},
        "reply_tokens": REPLY_TOKENS,
        "reply_chars": len(PROMPT) + len("echo (N messages): "),
        "view_open_messages": opened,
        "full_speed": {
            "runs": args.runs,
            "no_view_s": {"median": round(statistics.median(plain_times), 5),
                          "min": round(min(plain_times), 5)},
            "with_view_s": {"median": round(statistics.median(view_times), 5),
                            "min": round(min(view_times), 5)},
            "time_ratio": round(ratio, 3),  # median of paired ratios
            "with_view_until_drawn_s": {"median": round(statistics.median(drawn_times), 5),
                                        "min": round(min(drawn_times), 5)},
            "time_ratio_until_drawn": round(drawn_ratio, 3),
            "widget_messages_per_reply": [r["widget_messages"] for r in per_run],
            "stream_updates_per_reply": [r["stream_updates"] for r in per_run],
            "stream_s_per_reply": [r["stream_s"] for r in per_run],
            "runs_detail": per_run,
        },
        "paced": {
            "seconds_per_token": args.pace,
            "transcript_messages_before": before,
            "stream_s": round(seconds, 3),
            "widget_messages": len(sent),
            "widget_messages_per_s": round(len(sent) / seconds, 2),
            "max_widget_messages_in_any_1s": max_in_window([m[0] for m in sent]),
            "stream_updates": len(stream),
            "stream_updates_per_s": round(len(stream) / seconds, 2),
            "stream_update_bytes_by_quarter_mean": quarters(stream_bytes),
            "same_into_an_empty_chat_by_quarter_mean": quarters(fresh_bytes),
            "stream_update_bytes_max": max(stream_bytes),
            "stream_update_bytes_first_last": [stream_bytes[0], stream_bytes[-1]],
            "largest_message_bytes": max(m[1] for m in sent),
        },
    }
    fs = result["full_speed"]
    pc = result["paced"]
    result["targets"] = {
        "widget_messages_per_streaming_second <= 25": {
            "paced_average": pc["widget_messages_per_s"],
            "paced_max_in_any_1s": pc["max_widget_messages_in_any_1s"],
            "full_speed_max_per_reply": max(fs["widget_messages_per_reply"]),
            "ok": pc["max_widget_messages_in_any_1s"] <= 25
            and max(fs["widget_messages_per_reply"]) <= 25,
        },
        "time_with_view / without <= 1.2": {
            "consuming the stream": fs["time_ratio"],
            "until the view has drawn the final reply too": fs["time_ratio_until_drawn"],
            "ok": ratio <= 1.2 and drawn_ratio <= 1.2},
        "bytes per update flat": {
            "by quarter of the reply, into a chat of "
            f"{before} long messages": pc["stream_update_bytes_by_quarter_mean"],
            "by quarter of the reply, into an empty chat":
                pc["same_into_an_empty_chat_by_quarter_mean"],
            "ok": pc["stream_update_bytes_max"] < 7000
            and statistics.fmean(stream_bytes) < 1.5 * statistics.fmean(fresh_bytes),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k in ("targets",)}
    print(json.dumps(summary, indent=2))
    print(f"full speed: {fs['no_view_s']['median'] * 1000:.1f} ms without a view, "
          f"{fs['with_view_s']['median'] * 1000:.1f} ms with one (x{fs['time_ratio']}), "
          f"{fs['with_view_until_drawn_s']['median'] * 1000:.1f} ms until it has drawn "
          f"(x{fs['time_ratio_until_drawn']}); "
          f"paced: {pc['widget_messages']} messages in {pc['stream_s']} s; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
