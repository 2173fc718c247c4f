"""The per-layer table of chosen scales: exponents, max_shift clamps, scales rounded down."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from torch import nn
from torch.ao.quantization.observer import ObserverBase

from qlab.artifacts import atomic_write
from qlab.quant.observer import _Po2Mixin

FIELDS = ("layer", "tensor", "channels", "scale_min", "scale_max", "exp_min", "exp_max",
          "clamped", "rounded_down", "max_rel_err")


def _weight_observers(model: nn.Module) -> list[tuple[str, ObserverBase]]:
    """PTQ attaches no weight observer until convert: run qconfig.weight() on each weight now,
    exactly as convert will (after fusion the weight already has BN folded in)."""
    found = []
    for name, mod in model.named_modules():
        qconfig = getattr(mod, "qconfig", None)
        if qconfig is None or hasattr(mod, "weight_fake_quant"):
            continue
        inner = mod[0] if isinstance(mod, nn.Sequential) and len(mod) else mod
        if isinstance(inner, nn.Conv2d | nn.Linear) and hasattr(mod, "activation_post_process"):
            obs = qconfig.weight()
            obs(inner.weight.detach())
            found.append((name, obs))
    return found


def _observers(model: nn.Module) -> list[tuple[str, str, ObserverBase]]:
    rows = []
    for name, mod in model.named_modules():
        if not isinstance(mod, ObserverBase):
            continue
        parts = name.split(".")
        tensor = "weight" if "weight_fake_quant" in parts else "activation"
        layer = ".".join(p for p in parts if p not in ("activation_post_process", "weight_fake_quant"))
        rows.append((layer or "input", tensor, mod))
    rows += [(name, "weight", obs) for name, obs in _weight_observers(model)]
    return rows


def po2_row(layer: str, tensor: str, obs: ObserverBase) -> dict:
    """The scale-table row of one observer (po2: exponents, clamps, roundings; else the scales)."""
    if isinstance(obs, _Po2Mixin):
        p = obs.po2_qparams(obs.min_val, obs.max_val)
        raw, n, un, scale = p["raw_scale"], p["exponent"], p["unclamped_exponent"], p["scale"]
        valid = raw > 0
        rel = ((scale.double() - raw.double()).abs() / raw.double().clamp(min=1e-30))[valid]
        row = {"exp_min": int(n.min()), "exp_max": int(n.max()),
               "clamped": int((un != n).sum()),
               "rounded_down": int(((scale.double() < raw.double()) & valid).sum()),
               "max_rel_err": float(rel.max()) if rel.numel() else 0.0}
    else:  # torch's own observers: scales as they are
        scale, _ = obs.calculate_qparams()
        row = {"exp_min": "", "exp_max": "", "clamped": "", "rounded_down": "",
               "max_rel_err": ""}
    scale = scale.flatten().double()
    return {"layer": layer, "tensor": tensor, "channels": scale.numel(),
            "scale_min": float(scale.min()), "scale_max": float(scale.max()), **row}


def scale_table(model: nn.Module) -> list[dict]:
    """One row per observed tensor of a prepared (not yet converted) eager model."""
    return [po2_row(layer, tensor, obs) for layer, tensor, obs in _observers(model)]


def summarize(table: list[dict]) -> dict:
    """Totals over all scales: how many there are, hit the clamp, were rounded down."""
    po2 = [r for r in table if r["clamped"] != ""]
    out = {"tensors": len(table), "scales": sum(r["channels"] for r in table)}
    if po2:
        for tensor in ("weight", "activation"):
            rows = [r for r in po2 if r["tensor"] == tensor]
            out[tensor] = {
                "scales": sum(r["channels"] for r in rows),
                "clamped": sum(r["clamped"] for r in rows),
                "rounded_down": sum(r["rounded_down"] for r in rows),
                "exp_min": min((r["exp_min"] for r in rows), default=None),
                "exp_max": max((r["exp_max"] for r in rows), default=None),
            }
    return out


def write_scale_table(out_dir: Path, table: list[dict], *, max_shift: int | None) -> dict:
    """scales.csv (every row) and scales.md (summary plus the table); returns the summary."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(table)
    atomic_write(Path(out_dir) / "scales.csv", lambda tmp: tmp.write_text(buf.getvalue()))
    summary = summarize(table)
    lines = ["# Chosen quantization scales", ""]
    if "weight" in summary:
        lines += [
            f"Every scale is 2^n with n clamped to [-{max_shift}, {max_shift}]. `clamped`: scales "
            f"whose exponent fell outside that range; `rounded_down`: 2^n below the observed scale "
            f"(the largest values clip by up to that ratio).", "",
            "| tensors | scales | clamped | rounded down | exponents |", "|---|---|---|---|---|"]
        for tensor in ("weight", "activation"):
            s = summary[tensor]
            lines.append(f"| {tensor} | {s['scales']} | {s['clamped']} | {s['rounded_down']} | "
                         f"{s['exp_min']} .. {s['exp_max']} |")
        lines.append("")
    lines += ["| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    for r in table:
        cells = [f"{r[f]:.4g}" if isinstance(r[f], float) else str(r[f]) for f in FIELDS]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    atomic_write(Path(out_dir) / "scales.md", lambda tmp: tmp.write_text(text))
    return summary


def is_power_of_two(scale: torch.Tensor) -> bool:
    """True when every entry is exactly 2^n for an integer n."""
    mantissa, _ = torch.frexp(scale.double())
    return bool((mantissa == 0.5).all())
