"""Take a trained model anywhere: a standalone transformers folder (merged 16-bit weights), a GGUF file for llama.cpp /
LM Studio / Ollama (with a Modelfile), and the Hub.

    python -m grpo_ext.export RUN_OR_ADAPTER OUTPUT --format merged gguf [--dtype bf16] [--quant q8_0] [--push user/name]

The base is the one the adapter was trained on (its `adapter_config.json`, or --base); a QLoRA adapter (the run's
`resolved_config.yaml` says `load_in_4bit`, or --base-4bit) is merged into the dequantised NF4 weights it saw in
training (`merge.py`). Before anything is written, the drift of each way of merging from the adapter on its own base
is measured and logged. Every format goes into one temporary folder beside OUTPUT, renamed to OUTPUT at the end, so
an error (a full disk included) leaves no half-written OUTPUT.
"""

from __future__ import annotations

import argparse
import copy
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import cpu
from .checkpoints import NoSpaceLeftError, is_disk_full
from .merge import (
    DRIFT_HEADER,
    Drift,
    TrainedModel,
    adapter_model,
    drift_batch,
    find_trained_model,
    load_base,
    merged_model,
    next_token_drift,
    next_token_log_probs,
    trained_tokenizer,
)
from .models import gguf_source

logger = logging.getLogger("grpo_ext.export")  # not "__main__" under `python -m`: the CLI shows INFO of grpo_ext

EXPORT_INFO = "export.json"  # what was exported from what, with the measured drift: the Hub card reads it
# The GGUF file and its Modelfile get a folder of their own: transformers, asked for `gguf_file` in a folder that also
# holds a tokenizer (the merged format's), reads that tokenizer and not the chat template, which it has in a separate
# file. Alone in its folder, the GGUF file loads with the chat template of its metadata.
GGUF_FOLDER = "gguf"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ExportOptions:
    """How to export: the merged folder's `dtype` (`DTYPES`), the GGUF `quant` (`gguf_export.QUANTS`), what a QLoRA
    adapter is merged into (`merge_into`, `merge.MERGE_BASES`)."""

    dtype: str = "bf16"
    quant: str = "f16"
    merge_into: str = "nf4"


@dataclass
class Exported:
    """The merged float32 model and what every writer needs with it."""

    model: nn.Module
    tokenizer: object
    stop_token_ids: list[int]
    info: dict = field(default_factory=dict)


def write_merged(exported: Exported, folder: str, options: ExportOptions) -> list[str]:
    """A standalone transformers folder: weights in `options.dtype`, config, tokenizer with its chat template, and a
    generation config that stops where training stopped."""
    model = copy.deepcopy(exported.model).to(DTYPES[options.dtype])  # the float32 model stays for the other formats
    model.config._name_or_path = ""
    model.generation_config.eos_token_id = exported.stop_token_ids
    model.generation_config.pad_token_id = exported.tokenizer.pad_token_id
    model.save_pretrained(folder)
    exported.tokenizer.save_pretrained(folder)
    exported.info["merged"] = {"dtype": options.dtype}
    return sorted(os.listdir(folder))


def write_gguf_file(exported: Exported, folder: str, options: ExportOptions) -> list[str]:
    """`gguf/model-<quant>.gguf` for llama.cpp / LM Studio, and an Ollama `Modelfile` beside it (`GGUF_FOLDER`)."""
    from .gguf_export import write_gguf
    from .modelfile import MODELFILE, build_modelfile

    folder = os.path.join(folder, GGUF_FOLDER)
    os.makedirs(folder, exist_ok=True)
    name = f"model-{options.quant}.gguf"
    write_gguf(exported.model, exported.tokenizer, os.path.join(folder, name), options.quant, exported.stop_token_ids)
    stops = exported.tokenizer.convert_ids_to_tokens(exported.stop_token_ids)
    sampling = exported.info.get("sampling")
    with open(os.path.join(folder, MODELFILE), "w", encoding="utf-8") as file:
        file.write(build_modelfile(name, exported.tokenizer, stops, sampling))
    exported.info["gguf"] = {"file": f"{GGUF_FOLDER}/{name}", "quant": options.quant}
    return [f"{GGUF_FOLDER}/{name}", f"{GGUF_FOLDER}/{MODELFILE}"]


# --format name -> writer(exported, folder, options) -> file names written
FORMATS: dict[str, Callable[[Exported, str, ExportOptions], list[str]]] = {
    "merged": write_merged,
    "gguf": write_gguf_file,
}


# --- Drift of each merge from the adapter on its own base ---


def measure_drift(
    trained: TrainedModel, merged: nn.Module, tokenizer, options: ExportOptions, gguf: bool = False
) -> list[Drift]:
    """The drift from the adapter on the base it was trained on (4-bit for QLoRA) of: the merged model (float32), its
    weights rounded to the exported dtype, with `gguf` its weights as the GGUF file of `options.quant` stores them,
    and for QLoRA the merge into the other base. A full model (no adapter) is compared with itself rounded."""
    batch = drift_batch(tokenizer)
    mask = batch["attention_mask"]
    if trained.adapter:
        reference = next_token_log_probs(adapter_model(trained, load_base(trained, quantized=True)), batch)
    else:
        reference = next_token_log_probs(merged, batch)
    where = {"nf4": "dequantised NF4 base", "original": "original base"}
    label = f"merged into the {where[options.merge_into]}" if trained.four_bit else "merged"
    if not trained.adapter:
        label = "full model"
    drifts = []
    if trained.adapter:
        drifts.append(next_token_drift(f"{label}, fp32", reference, next_token_log_probs(merged, batch), mask))
    if options.dtype != "fp32":
        rounded = rounded_weights(merged, DTYPES[options.dtype])
        drifts.append(
            next_token_drift(f"{label}, {options.dtype}", reference, next_token_log_probs(rounded, batch), mask)
        )
        del rounded
    if gguf:
        from .gguf_export import file_rounded

        rounded = file_rounded(merged, options.quant)
        drifts.append(next_token_drift(f"GGUF {options.quant}", reference, next_token_log_probs(rounded, batch), mask))
        del rounded
    if trained.four_bit:
        other = "original" if options.merge_into == "nf4" else "nf4"
        alternative = merged_model(trained, other)
        drifts.append(
            next_token_drift(
                f"merged into the {where[other]}, fp32", reference, next_token_log_probs(alternative, batch), mask
            )
        )
    return drifts


def rounded_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A float32 copy of `model` whose weights are rounded to `dtype`, the values a merged folder holds; buffers
    (rotary frequencies) stay float32 as transformers computes them at load, so only the export's rounding shows."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.to(dtype))
    return rounded


def drift_table(drifts: list[Drift], reference: str) -> str:
    return f"Next-token drift from {reference} on {drifts[0].positions} positions:\n{DRIFT_HEADER}\n" + "\n".join(
        drift.row() for drift in drifts
    )


# --- The export ---


def export_model(
    run_or_adapter: str | os.PathLike,
    output: str | os.PathLike,
    formats: list[str] | tuple[str, ...] = ("merged",),
    options: ExportOptions | None = None,
    *,
    base: str | None = None,
    base_4bit: bool | None = None,
    push_to: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    api=None,
) -> dict:
    """Export a run (adapter or full model) to `output` in each of `formats` (`FORMATS`), measuring the drift of the
    merge; with `push_to`, upload the result to that Hub repo (`hub.push_export_to_hub`). Returns the export info
    (also written as `export.json`)."""
    options = options or ExportOptions()
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"format {unknown or formats}: use one or more of {tuple(FORMATS)}.")
    if options.dtype not in DTYPES:
        raise ValueError(f"dtype={options.dtype!r}: use one of {tuple(DTYPES)}.")
    output = os.path.abspath(os.fspath(output))
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise FileExistsError(f"OUTPUT {output} exists and is not empty: choose a new folder or delete it first.")
    trained = find_trained_model(os.fspath(run_or_adapter), base=base, base_4bit=base_4bit)
    if "gguf" in formats and gguf_source(trained.base) is None:  # refuse an architecture before the (slow) merge
        from transformers import AutoConfig

        from .gguf_export import check_architecture

        check_architecture(AutoConfig.from_pretrained(trained.base))
    merge_into = options.merge_into if trained.four_bit else "original"
    tokenizer = trained_tokenizer(trained)
    merged = merged_model(trained, merge_into)
    from .rollout import eos_token_ids

    info = {
        "base": trained.base if trained.adapter else None,
        "adapter": trained.folder if trained.adapter else None,
        "model": None if trained.adapter else trained.folder,
        "merge_into": merge_into if trained.adapter else None,
        "four_bit": trained.four_bit,
        "formats": list(formats),
        "sampling": trained.sampling,
    }
    exported = Exported(merged, tokenizer, eos_token_ids(merged, tokenizer), info)
    options = ExportOptions(options.dtype, options.quant, merge_into)
    drifts = measure_drift(trained, merged, tokenizer, options, gguf="gguf" in formats)
    reference = "the adapter on its 4-bit base" if trained.four_bit else "the adapter on its base"
    reference = reference if trained.adapter else "the fine-tuned model in fp32"
    if drifts:
        logger.info("%s", drift_table(drifts, reference))
    info["drift"] = {"reference": reference, "rows": [asdict(drift) for drift in drifts]}

    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's folder is private; OUTPUT is an ordinary folder
    try:
        for name in formats:
            FORMATS[name](exported, staging, options)
        with open(os.path.join(staging, EXPORT_INFO), "w", encoding="utf-8") as file:
            json.dump(info, file, indent=2)
        if os.path.isdir(output):
            os.rmdir(output)  # empty (checked above)
        os.rename(staging, output)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, Exception) and is_disk_full(error, staging):
            raise NoSpaceLeftError(
                errno.ENOSPC,
                f"no space left on device while exporting to {output}; nothing was written there. Free disk "
                "space (a merged bf16 model needs about 2 bytes per parameter, f16 GGUF as much) and export again.",
            ) from error
        raise
    logger.info("Exported %s to %s", ", ".join(formats), output)
    if push_to:
        from .hub import push_export_to_hub

        push_export_to_hub(output, push_to, token=token, private=private, api=api)
    return info


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main() -> None:
    from .gguf_export import QUANTS  # numpy and torch only: gguf itself loads when a file is written

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_or_adapter", help="a run's output_dir, an adapter folder, or a full model folder")
    parser.add_argument("output", help="new folder for the exported files")
    parser.add_argument("--format", nargs="+", default=["merged"], choices=tuple(FORMATS), dest="formats")
    parser.add_argument("--dtype", default="bf16", choices=tuple(DTYPES), help="the merged folder's weights")
    parser.add_argument("--quant", default="f16", choices=tuple(QUANTS), help="the GGUF file's weights")
    parser.add_argument("--base", help="the base model the adapter was trained on (default: from adapter_config.json)")
    parser.add_argument(
        "--base-4bit", action="store_true", default=None, help="the adapter was trained on a 4-bit base"
    )
    parser.add_argument(
        "--merge-into", default="nf4", choices=("nf4", "original"), help="QLoRA: merge into the dequantised NF4 base "
        "the adapter saw in training (default) or into the original full-precision base"
    )  # fmt: skip
    parser.add_argument("--push", metavar="USER/NAME", help="upload the export to this Hub repo (token: HF_TOKEN)")
    parser.add_argument("--private", action="store_true", default=None, help="a new Hub repo is private")
    cli = parser.parse_args()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("grpo_ext").setLevel(logging.INFO)
    cpu.set_torch_threads()  # the merge and the drift run on the CPU
    export_model(
        cli.run_or_adapter, cli.output, cli.formats, ExportOptions(cli.dtype, cli.quant, cli.merge_into),
        base=cli.base, base_4bit=cli.base_4bit, push_to=cli.push, private=cli.private,
        token=os.environ.get("HF_TOKEN"),  # given, so the upload is scanned for it (huggingface_hub reads it anyway)
    )  # fmt: skip
    print(f"exported to {cli.output} (the drift table is in the log above and in {EXPORT_INFO})")  # noqa: T201 - the command line's output


if __name__ == "__main__":
    main()
