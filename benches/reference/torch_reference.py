#!/usr/bin/env python3
"""PyTorch (and optionally ONNX Runtime) reference for sift's CPU inference.

Rebuilds sift's classifier (models/src/classifier.rs, models/src/ops.rs,
models/src/config.rs) as a torch ``nn.Module`` from a model directory's
``config.json`` and ``model.safetensors``, scores the token ids that
``sift bench model --export DIR`` wrote to ``DIR/encoded.jsonl``, and checks
the result against ``DIR/sift_scores.jsonl``:

* the same top-5 labels in the same order for every document; two labels may
  trade places only where the reference scores them within ``--tie`` (1e-5)
  of each other, since then the order is decided by rounding;
* the largest |sift score - reference score| over every label sift reported,
  which must stay within ``--tolerance`` (1e-3).

Both sides see the same batches (documents sorted by (token count, input
position), cut into chunks of ``--batch``) and the same thread count, so the
documents/s figures compare the two implementations of the same arithmetic.
Only the model is timed (forward pass, scores, top 5); tokenization is
excluded on both sides. The exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

# Added to the attention scores of padding keys, as classifier.rs does
# (MASKED_SCORE): their softmax weight underflows to exactly 0 in f32.
MASKED_SCORE = -1e4
TOP_K = 5


# --------------------------------------------------------------------------
# The model, mirroring classifier.rs module for module and op for op.
# --------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """ops.rs LayerNorm: biased variance over the last dimension, then gain
    and bias; the same arithmetic as ``F.layer_norm``."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.eps = eps
        # A constant, not read from the input, so every exporter sees a fixed
        # normalised shape.
        self.shape = (hidden,)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(xs, self.shape, self.weight, self.bias, self.eps)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, fused: bool):
        super().__init__()
        self.fused = fused
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, hidden)
        self.heads = heads
        self.head_dim = hidden // heads

    def forward(self, xs: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, t, h = xs.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)

        q = split(self.query(xs))
        k = split(self.key(xs))
        v = split(self.value(xs))
        if self.fused:
            # torch's fused kernel: the same function, not the same op order.
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias)
            return self.output(context.transpose(1, 2).reshape(b, t, h))
        scale = 1.0 / math.sqrt(self.head_dim)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale + mask_bias
        probs = torch.softmax(scores, dim=-1)
        context = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, h)
        return self.output(context)


class FeedForward(nn.Module):
    def __init__(self, hidden: int, ff: int):
        super().__init__()
        self.up = nn.Linear(hidden, ff)
        self.down = nn.Linear(ff, hidden)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        # Exact (erf) GELU, as candle's gelu_erf.
        return self.down(F.gelu(self.up(xs), approximate="none"))


class EncoderLayer(nn.Module):
    def __init__(self, config: dict, fused: bool):
        super().__init__()
        hidden, eps = config["hidden"], config["norm_eps"]
        self.attention = SelfAttention(hidden, config["heads"], fused)
        self.attention_norm = LayerNorm(hidden, eps)
        self.ff = FeedForward(hidden, config["ff"])
        self.ff_norm = LayerNorm(hidden, eps)
        self.pre_norm = config["norm"] == "pre"

    def forward(self, xs: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            xs = xs + self.attention(self.attention_norm(xs), mask_bias)
            return xs + self.ff(self.ff_norm(xs))
        xs = self.attention_norm(xs + self.attention(xs, mask_bias))
        return self.ff_norm(xs + self.ff(xs))


class Embeddings(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.tokens = nn.Embedding(config["vocab_size"], config["hidden"])
        self.positions = nn.Embedding(config["max_len"], config["hidden"])
        # Post-norm (BERT) models normalise the embeddings.
        if config["norm"] == "post":
            self.norm = LayerNorm(config["hidden"], config["norm_eps"])
        else:
            self.norm = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        xs = self.tokens(input_ids) + self.positions(positions)
        return self.norm(xs) if self.norm is not None else xs


def masked_mean(xs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``xs`` [B, T, D] over positions where ``mask`` [B, T] is 1;
    rows with no real position give zeros (classifier.rs masked_mean)."""
    weights = mask.unsqueeze(-1)
    total = (xs * weights).sum(1)
    count = weights.sum(1).clamp(min=1.0)
    return total / count


class Classifier(nn.Module):
    """sift's classifier; parameter names equal the safetensors tensor names.
    ``fused_attention`` swaps the op-for-op attention for torch's
    ``scaled_dot_product_attention``: what a PyTorch deployment would use."""

    def __init__(self, config: dict, fused_attention: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config, fused_attention) for _ in range(config["layers"]))
        # Pre-norm models normalise the last layer's output.
        if config["norm"] == "pre":
            self.final_norm = LayerNorm(config["hidden"], config["norm_eps"])
        else:
            self.final_norm = None
        ngrams = config.get("ngrams")
        self.ngrams = nn.Embedding(ngrams["buckets"], ngrams["dim"]) if ngrams else None
        head_input = config["hidden"] + (ngrams["dim"] if ngrams else 0)
        self.head = nn.Linear(head_input, config["num_labels"])
        self.mean_pooling = config["pooling"] == "mean"
        self.softmax_output = config["output"] == "softmax"

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        ngram_ids: torch.Tensor,
        ngram_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Per-label scores [B, num_labels] (sigmoid or softmax of the logits,
        per the config, as ops.rs ``scores``). ``attention_mask`` and
        ``ngram_mask`` are f32, 1 for real positions; the n-gram pair is
        ignored when the model has no n-gram branch."""
        xs = self.embeddings(input_ids)
        # 0 for real keys, MASKED_SCORE for padding, broadcast over heads and
        # query positions.
        mask_bias = (attention_mask * -MASKED_SCORE + MASKED_SCORE)[:, None, None, :]
        for layer in self.layers:
            xs = layer(xs, mask_bias)
        if self.final_norm is not None:
            xs = self.final_norm(xs)
        pooled = masked_mean(xs, attention_mask) if self.mean_pooling else xs[:, 0]
        if self.ngrams is not None:
            bag = masked_mean(self.ngrams(ngram_ids), ngram_mask)
            pooled = torch.cat([pooled, bag], dim=1)
        logits = self.head(pooled)
        if self.softmax_output:
            return torch.softmax(logits, dim=-1)
        return torch.sigmoid(logits)


def load_model(model_dir: Path, fused_attention: bool = False) -> tuple[Classifier, dict, list[str]]:
    config = json.loads((model_dir / "config.json").read_text())
    # serde defaults (config.rs) for fields an older config.json may lack.
    config.setdefault("pooling", "mean")
    config.setdefault("norm", "pre")
    config.setdefault("norm_eps", 1e-5)
    config.setdefault("output", "sigmoid")
    labels = json.loads((model_dir / "labels.json").read_text())
    if len(labels) != config["num_labels"]:
        raise SystemExit(
            f"{model_dir}/labels.json has {len(labels)} labels but config.json says {config['num_labels']}"
        )
    model = Classifier(config, fused_attention)
    tensors = load_file(str(model_dir / "model.safetensors"))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise SystemExit(
            f"{model_dir}/model.safetensors does not fit config.json: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise SystemExit(
                f"tensor {name} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    model.eval()
    return model, config, labels


# --------------------------------------------------------------------------
# Inputs and batches, exactly as `sift bench model` cuts them.
# --------------------------------------------------------------------------


@dataclass
class Batch:
    """One padded chunk: input positions plus the four model inputs."""

    rows: list[int]
    ids: np.ndarray  # [B, T] int64, 0 after each document's end
    mask: np.ndarray  # [B, T] f32
    ngram_ids: np.ndarray  # [B, L] int64
    ngram_mask: np.ndarray  # [B, L] f32
    torch_inputs: tuple = field(default=(), repr=False)


def pad(lists: list[list[int]], min_width: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pads to the longest list (at least 1 wide, as batch.rs ``pad`` and
    ``NgramBatch::from_lists`` do) with 0 and a 0/1 mask."""
    width = max(min_width, max((len(x) for x in lists), default=0))
    ids = np.zeros((len(lists), width), dtype=np.int64)
    mask = np.zeros((len(lists), width), dtype=np.float32)
    for row, values in enumerate(lists):
        ids[row, : len(values)] = values
        mask[row, : len(values)] = 1.0
    return ids, mask


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as lines:
        return [json.loads(line) for line in lines if line.strip()]


def make_batches(encoded: list[dict], batch: int) -> list[Batch]:
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]["ids"]), i))
    batches = []
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        ids, mask = pad([encoded[i]["ids"] for i in rows])
        ngram_ids, ngram_mask = pad([encoded[i]["ngrams"] for i in rows])
        b = Batch(rows, ids, mask, ngram_ids, ngram_mask)
        b.torch_inputs = tuple(torch.from_numpy(a) for a in (ids, mask, ngram_ids, ngram_mask))
        batches.append(b)
    return batches


def export_sample(encoded: list[dict], max_len: int) -> Batch:
    """Two documents padded at least 2 wide: torch.export fixes any axis whose
    example size is 1, which would make the ONNX graph refuse other sizes."""
    rows = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["ids"]))[-2:]
    rows = (rows * 2)[:2]
    ids, mask = pad([encoded[i]["ids"] for i in rows], min(2, max_len))
    ngram_ids, ngram_mask = pad([encoded[i]["ngrams"] for i in rows], 2)
    b = Batch(rows, ids, mask, ngram_ids, ngram_mask)
    b.torch_inputs = tuple(torch.from_numpy(a) for a in (ids, mask, ngram_ids, ngram_mask))
    return b


# --------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------


@dataclass
class Timed:
    seconds: float
    scores: np.ndarray  # [docs, num_labels] in input order, from the last pass


def time_passes(batches: list[Batch], docs: int, labels: int, score_batch, repeat: int) -> Timed:
    """Warms up on the longest batch (as sift does), then times ``repeat``
    passes over every batch and keeps the best. ``score_batch`` returns the
    batch's scores and its top-5 positions; the top 5 is part of the timed
    work on both sides."""
    score_batch(batches[-1])
    best = math.inf
    kept: list[np.ndarray] = []
    for _ in range(repeat):
        started = time.perf_counter()
        out = [score_batch(b)[0] for b in batches]
        best = min(best, time.perf_counter() - started)
        kept = out
    scores = np.zeros((docs, labels), dtype=np.float32)
    for b, s in zip(batches, kept, strict=True):
        scores[b.rows] = s
    return Timed(best, scores)


def torch_scorer(model: Classifier):
    def score(b: Batch):
        with torch.inference_mode():
            s = model(*b.torch_inputs)
            top = torch.topk(s, min(TOP_K, s.shape[1]), dim=1).indices
        return s.numpy(), top.numpy()

    return score


# --------------------------------------------------------------------------
# ONNX export and ONNX Runtime.
# --------------------------------------------------------------------------


def export_onnx(model: Classifier, sample: Batch, path: Path) -> str:
    """Exports with dynamic batch, sequence and n-gram axes; returns which
    exporter produced the file."""
    # The exporter logs every optional op it skips and every axis it renames;
    # none of it matters here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"torch\.onnx")
    args = tuple(sample.torch_inputs)
    names = ["input_ids", "attention_mask", "ngram_ids", "ngram_mask"]
    try:
        batch = torch.export.Dim("batch")
        seq = torch.export.Dim("seq", max=model.config["max_len"])
        grams = torch.export.Dim("ngrams")
        shapes = {
            "input_ids": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: seq},
            "ngram_ids": {0: batch, 1: grams},
            "ngram_mask": {0: batch, 1: grams},
        }
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=names,
            output_names=["scores"],
            dynamic_shapes=shapes,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        return "torch.export (dynamo)"
    except Exception as error:  # noqa: BLE001 - fall back to the older exporter
        print(f"note: the dynamo ONNX exporter failed ({error}); using TorchScript", file=sys.stderr)
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "seq"},
        "ngram_ids": {0: "batch", 1: "ngrams"},
        "ngram_mask": {0: "batch", 1: "ngrams"},
        "scores": {0: "batch"},
    }
    torch.onnx.export(
        model,
        args,
        str(path),
        input_names=names,
        output_names=["scores"],
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )
    return "TorchScript"


def quantize_onnx(path: Path, out: Path) -> None:
    """ONNX Runtime's dynamic int8 quantisation with its defaults (int8
    weights per tensor, activations quantised per tensor at run time): what
    a user of ONNX Runtime gets from the documented one-liner."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The dynamo exporter records intermediate shapes that ONNX's own shape
    # inference, run by the quantiser, then contradicts ("Inferred shape and
    # existing shape differ"); without them it infers its own.
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    plain = out.with_suffix(".shapeless.onnx")
    onnx.save(model, str(plain))
    quantize_dynamic(str(plain), str(out), weight_type=QuantType.QInt8)


def onnx_scorer(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}

    def score(b: Batch):
        feeds = {
            "input_ids": b.ids,
            "attention_mask": b.mask,
            "ngram_ids": b.ngram_ids,
            "ngram_mask": b.ngram_mask,
        }
        # An exporter may drop inputs the graph does not use (the n-gram
        # pair of a model without that branch).
        (s,) = session.run(["scores"], {k: v for k, v in feeds.items() if k in wanted})
        k = min(TOP_K, s.shape[1])
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        return s, top

    return score, ort.__version__


# --------------------------------------------------------------------------
# The correctness check.
# --------------------------------------------------------------------------


def top_k(row: np.ndarray, k: int) -> list[int]:
    """Highest first, ties to the lower position (metrics.rs ``top_k``)."""
    order = np.lexsort((np.arange(len(row)), -row.astype(np.float64)))
    return [int(i) for i in order[:k]]


@dataclass
class Check:
    max_abs_diff: float
    max_abs_diff_id: str | None
    top5_differ: int
    first_differ: list[dict]
    ties_allowed: int

    def as_json(self) -> dict:
        return {
            "max_abs_score_diff": self.max_abs_diff,
            "max_abs_score_diff_id": self.max_abs_diff_id,
            "top5_differ": self.top5_differ,
            "top5_order_swaps_within_tie": self.ties_allowed,
            "first_differ": self.first_differ,
        }


def agreement(reference: np.ndarray, tops: list[list[int]]) -> dict:
    """How often a quantised model's top 5 (``tops``, per document) matches
    the f32 reference's: the same first label, the same set of five."""
    top1 = top5 = 0
    for row, theirs in zip(reference, tops, strict=True):
        ours = top_k(row, len(theirs))
        top1 += bool(ours) and bool(theirs) and ours[0] == theirs[0]
        top5 += set(ours) == set(theirs)
    n = len(tops)
    return {
        "same_top1": top1 / n,
        "same_top5_set": top5 / n,
        "documents": n,
    }


def check(
    scores: np.ndarray, sift: list[dict], ids: list[str], label_index: dict[str, int], tie: float
) -> Check:
    """Compares sift's top 5 with a reference's full score matrix."""
    max_diff, max_id = 0.0, None
    differ, ties, first = 0, 0, []
    for row, (doc_id, theirs) in enumerate(zip(ids, sift, strict=True)):
        if theirs["id"] != doc_id:
            raise SystemExit(
                f"sift_scores.jsonl line {row + 1} is document {theirs['id']!r}, "
                f"encoded.jsonl has {doc_id!r}: the files are not from one export"
            )
        ref = scores[row]
        their_labels = [label_index[s["label"]] for s in theirs["top5"]]
        for s, label in zip(theirs["top5"], their_labels, strict=True):
            diff = abs(float(s["score"]) - float(ref[label]))
            if math.isnan(diff):
                diff = math.inf
            if diff > max_diff:
                max_diff, max_id = diff, doc_id
        ours = top_k(ref, len(their_labels))
        same, swapped = True, False
        for a, b in zip(ours, their_labels, strict=False):  # lengths compared below
            if a == b:
                continue
            # Rounding decides the order of labels the model scores alike.
            if abs(float(ref[a]) - float(ref[b])) <= tie:
                swapped = True
            else:
                same = False
        if len(ours) != len(their_labels):
            same = False
        if not same:
            differ += 1
            if len(first) < 5:
                names = {v: k for k, v in label_index.items()}
                first.append(
                    {
                        "id": doc_id,
                        "sift": [names[i] for i in their_labels],
                        "reference": [names[i] for i in ours],
                    }
                )
        elif swapped:
            ties += 1
    return Check(max_diff, max_id, differ, first, ties)


# --------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------


def rate(docs: int, tokens: int, seconds: float) -> dict:
    return {
        "seconds": seconds,
        "docs_per_second": docs / seconds,
        "tokens_per_second": tokens / seconds,
    }


def print_table(report: dict) -> None:
    rows = [("sift", report["sift"], None)]
    rows.append(("torch", report["torch"], report["torch"]["check"]))
    if "onnxruntime" in report:
        rows.append(("onnxruntime", report["onnxruntime"], report["onnxruntime"]["check"]))
    print()
    print(
        f"{report['docs']} documents, {report['tokens']} tokens, batch {report['batch']}, "
        f"{report['threads']} threads, best of {report['repeat']} passes "
        "(model only, tokenization excluded)"
    )
    header = (
        f"{'':15} {'docs/s':>10} {'tokens/s':>11} {'seconds':>9} {'max|Δscore|':>12} {'top-5 differ':>13}"
    )
    print(header)
    print("-" * len(header))
    for name, figures, result in rows:
        diff = f"{result['max_abs_score_diff']:.2e}" if result else "-"
        differ = f"{result['top5_differ']}/{report['docs']}" if result else "-"
        print(
            f"{name:15} {figures['docs_per_second']:10.1f} {figures['tokens_per_second']:11.0f} "
            f"{figures['seconds']:9.3f} {diff:>12} {differ:>13}"
        )
    for name in ("sift_int8", "onnxruntime_int8"):
        if name in report:
            figures = report[name]
            a = figures["agreement_with_f32"]
            print(
                f"{name:15} {figures['docs_per_second']:10.1f} {figures['tokens_per_second']:11.0f} "
                f"{figures['seconds']:9.3f}   same top 1 {a['same_top1']:.2%}, same top-5 set {a['same_top5_set']:.2%}"
            )
    print()
    print(f"sift / torch throughput: {report['sift_over_torch']:.2f}x")
    for name, over in (("sift_int8", "torch"), ("sift_int8", "onnxruntime_int8")):
        key = f"{name}_over_{over}"
        if key in report:
            print(f"{name} / {over} throughput: {report[key]:.2f}x")
    if "sift_over_onnxruntime" in report:
        print(f"sift / onnxruntime throughput: {report['sift_over_onnxruntime']:.2f}x")
    for name, _, result in rows[1:]:
        for d in result["first_differ"]:
            print(f"  {name} top 5 differs on {d['id']}: sift {d['sift']} vs {d['reference']}")
    verdict = "PASS" if report["pass"] else "FAIL"
    print(
        f"{verdict}: tolerance {report['tolerance']:g} on scores, "
        f"order swaps allowed only within {report['tie']:g}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model directory")
    parser.add_argument(
        "--export",
        type=Path,
        required=True,
        help="directory `sift bench model --export` wrote (encoded.jsonl, sift_scores.jsonl, sift.json)",
    )
    parser.add_argument("--batch", type=int, help="documents per batch (default: sift.json's)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: sift.json's)")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes; the best counts")
    parser.add_argument(
        "--sdpa",
        action="store_true",
        help="torch's fused scaled_dot_product_attention instead of the op-for-op attention",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also export to ONNX and time ONNX Runtime, in f32 and with dynamic int8 quantisation",
    )
    parser.add_argument(
        "--int8-export",
        type=Path,
        help="directory `sift bench model --dtype int8 --export` wrote: reported beside the others, "
        "with its agreement with the f32 reference",
    )
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest |score difference| allowed")
    parser.add_argument("--tie", type=float, default=1e-5, help="scores this close may swap order")
    parser.add_argument("--out", type=Path, help="report path (default EXPORT/reference.json)")
    args = parser.parse_args()

    sift_timing = json.loads((args.export / "sift.json").read_text())
    batch = args.batch or int(sift_timing["batch"])
    threads = args.threads or int(sift_timing["threads"])
    if batch != int(sift_timing["batch"]) or threads != int(sift_timing["threads"]):
        print(
            f"warning: sift ran with batch {sift_timing['batch']} and {sift_timing['threads']} "
            f"threads, the reference with batch {batch} and {threads}: the figures do not compare",
            file=sys.stderr,
        )
    # Before any parallel work, or torch refuses to change the pools.
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)

    model, config, labels = load_model(args.model, args.sdpa)
    if config["num_labels"] != sift_timing.get("model", {}).get("num_labels", config["num_labels"]):
        raise SystemExit("sift.json describes a different model than --model")
    encoded = read_jsonl(args.export / "encoded.jsonl")
    sift_scores = read_jsonl(args.export / "sift_scores.jsonl")
    if not encoded or len(encoded) != len(sift_scores):
        raise SystemExit(
            f"encoded.jsonl has {len(encoded)} documents and sift_scores.jsonl {len(sift_scores)}; "
            "export again"
        )
    too_long = [e["id"] for e in encoded if len(e["ids"]) > config["max_len"]]
    if too_long:
        raise SystemExit(f"{len(too_long)} documents exceed max_len {config['max_len']}: {too_long[:3]}")
    if config.get("ngrams") is None and any(e["ngrams"] for e in encoded):
        raise SystemExit("encoded.jsonl has n-grams but the model has no n-gram branch")
    ids = [e["id"] for e in encoded]
    docs = len(encoded)
    tokens = sum(len(e["ids"]) for e in encoded)
    label_index = {name: i for i, name in enumerate(labels)}
    unknown = {s["label"] for d in sift_scores for s in d["top5"]} - set(label_index)
    if unknown:
        raise SystemExit(f"sift_scores.jsonl names labels not in labels.json: {sorted(unknown)[:5]}")
    if docs != int(sift_timing["docs"]) or tokens != int(sift_timing["tokens"]):
        print(
            f"warning: sift.json counts {sift_timing['docs']} documents and {sift_timing['tokens']} "
            f"tokens, encoded.jsonl {docs} and {tokens}",
            file=sys.stderr,
        )

    batches = make_batches(encoded, batch)
    num_labels = config["num_labels"]

    torch_run = time_passes(batches, docs, num_labels, torch_scorer(model), args.repeat)
    torch_check = check(torch_run.scores, sift_scores, ids, label_index, args.tie)
    report = {
        "model": str(args.model),
        "export": str(args.export),
        "docs": docs,
        "tokens": tokens,
        "batch": batch,
        "threads": threads,
        "repeat": args.repeat,
        "timed": "forward pass + scores + top 5 per batch; inputs padded beforehand; "
        "warm-up on the longest batch; best pass",
        "tolerance": args.tolerance,
        "tie": args.tie,
        "host": {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "cpu_model": sift_timing.get("cpu") or platform.processor(),
            "python": platform.python_version(),
            # Other work on the machine skews every figure; this says how busy it was.
            "load_average_1m_at_end": os.getloadavg()[0],
        },
        "sift": {
            "seconds": float(sift_timing["seconds"]),
            "docs_per_second": float(sift_timing["docs_per_second"]),
            "tokens_per_second": float(sift_timing["tokens_per_second"]),
            "threads": sift_timing["threads"],
            "batch": sift_timing["batch"],
        },
        "torch": {
            **rate(docs, tokens, torch_run.seconds),
            "version": torch.__version__,
            "intra_op_threads": torch.get_num_threads(),
            "attention": "scaled_dot_product_attention" if args.sdpa else "op for op as classifier.rs",
            "check": torch_check.as_json(),
        },
    }
    report["sift_over_torch"] = report["sift"]["docs_per_second"] / report["torch"]["docs_per_second"]
    checks = [torch_check]

    if args.onnx:
        path = args.export / "model.onnx"
        exporter = export_onnx(model, export_sample(encoded, config["max_len"]), path)
        scorer, version = onnx_scorer(path, threads)
        ort_run = time_passes(batches, docs, num_labels, scorer, args.repeat)
        ort_check = check(ort_run.scores, sift_scores, ids, label_index, args.tie)
        report["onnxruntime"] = {
            **rate(docs, tokens, ort_run.seconds),
            "version": version,
            "exporter": exporter,
            "provider": "CPUExecutionProvider",
            "intra_op_threads": threads,
            "check": ort_check.as_json(),
        }
        report["sift_over_onnxruntime"] = (
            report["sift"]["docs_per_second"] / report["onnxruntime"]["docs_per_second"]
        )
        checks.append(ort_check)

        quantized = args.export / "model.int8.onnx"
        quantize_onnx(path, quantized)
        scorer, _ = onnx_scorer(quantized, threads)
        int8_run = time_passes(batches, docs, num_labels, scorer, args.repeat)
        report["onnxruntime_int8"] = {
            **rate(docs, tokens, int8_run.seconds),
            "version": version,
            "quantization": "quantize_dynamic(weight_type=QInt8), its defaults",
            "intra_op_threads": threads,
            "agreement_with_f32": agreement(
                torch_run.scores, [top_k(row, TOP_K) for row in int8_run.scores]
            ),
        }

    if args.int8_export:
        timing = json.loads((args.int8_export / "sift.json").read_text())
        int8_scores = read_jsonl(args.int8_export / "sift_scores.jsonl")
        if [d["id"] for d in int8_scores] != ids:
            raise SystemExit(f"{args.int8_export} scored other documents than {args.export}")
        report["sift_int8"] = {
            "seconds": float(timing["seconds"]),
            "docs_per_second": float(timing["docs_per_second"]),
            "tokens_per_second": float(timing["tokens_per_second"]),
            "kernel": timing.get("int8_kernel"),
            "agreement_with_f32": agreement(
                torch_run.scores,
                [[label_index[s["label"]] for s in d["top5"]] for d in int8_scores],
            ),
        }
        report["sift_int8_over_torch"] = (
            report["sift_int8"]["docs_per_second"] / report["torch"]["docs_per_second"]
        )
        if "onnxruntime_int8" in report:
            report["sift_int8_over_onnxruntime_int8"] = (
                report["sift_int8"]["docs_per_second"]
                / report["onnxruntime_int8"]["docs_per_second"]
            )

    report["pass"] = all(c.max_abs_diff <= args.tolerance and c.top5_differ == 0 for c in checks)
    out = args.out or args.export / "reference.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {out}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
