"""Images in a rollout, as in TRL: prompts with image parts -> the processor's model-specific tensors, kept per row.

A TRL vision-language dataset has a conversational `prompt` and an `image` column (one image per row) or an `images`
column (a list per row). `with_images` puts each row's images into its prompt as image parts
(`trl.data_utils.prepare_multimodal_messages`: before the text of the first user message when the content is a
string, else into the `{"type": "image"}` placeholders), so generation, the reward functions (`prompts`) and the logs
see the prompt TRL builds. `rollout.encode_image_prompts` renders each prompt with the processor's chat template and runs the
processor on its text and images: token ids with the image placeholders expanded (`(B, P)`, left-padded) and, per
row, the model-specific tensors (`VisionInputs`): `pixel_values`, `image_grid_thw` (Qwen2-VL / Qwen2.5-VL),
`mm_token_type_ids` or `token_type_ids` (one per prompt token), `pixel_attention_mask`, `image_sizes`... The rollout
carries them (`Rollout.vision`) to every pass over its rows: generation, the old / reference passes and each training
micro-batch, whose rows take their own images (`VisionInputs.select`).

A group's prompt and its images are encoded once for its G completions, in generation and scoring, for the Qwen2-VL
family (`prefix_sharing.py`); other models take `model.generate` and the plain scoring pass (`rollout.plan_generation`).
What it does not do yet: draft tokens or run tools with images. Videos are not handled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = [
    "IMAGE_COLUMNS",
    "VisionInputs",
    "is_processor",
    "tokenizer_of",
    "is_vision_model",
    "image_column",
    "load_image",
    "with_images",
    "prompt_images",
    "has_images",
    "check_vision_setup",
]

IMAGE_COLUMNS = ("images", "image")  # TRL's names: a list of images per row, or one image per row
# The processor's outputs with one value per prompt token (the others are per image, or per patch of an image)
TOKEN_ALIGNED = ("token_type_ids", "mm_token_type_ids")


def is_processor(processing_class) -> bool:
    """A multimodal processor (`transformers.ProcessorMixin`, e.g. `AutoProcessor.from_pretrained(...)`), not a
    tokenizer: TRL's test for a vision-language model."""
    from transformers import ProcessorMixin

    return isinstance(processing_class, ProcessorMixin)


def tokenizer_of(processing_class):
    """The tokenizer of a processing class: a processor's `.tokenizer`, else the tokenizer itself."""
    return processing_class.tokenizer if is_processor(processing_class) else processing_class


def is_vision_model(model) -> bool:
    """Whether the model takes images (its config has a vision tower)."""
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None


def image_column(columns) -> str | None:
    """The dataset's image column (`images` first, as TRL reads it), or None."""
    return next((name for name in IMAGE_COLUMNS if name in columns), None)


def load_image(value, where: str):
    """A PIL image from a dataset value: a PIL image, a path, or the `{"bytes", "path"}` dict of an undecoded
    `datasets.Image` feature. `where` names the row and column in the error."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        import io

        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
    elif isinstance(value, (str, os.PathLike)):
        value = os.fspath(value)
    else:
        raise TypeError(
            f"{where}: the image is {type(value).__name__} ({value!r:.80}), not a PIL image, a path or a "
            "datasets.Image value. Store images as PIL images (datasets' Image feature) or file paths."
        )
    try:
        image = Image.open(value)
        image.load()
    except Exception as error:
        raise ValueError(
            f"{where}: the image {value if isinstance(value, str) else 'bytes'!r:.200} could not be opened "
            f"({type(error).__name__}: {error}). Fix the path or drop the row."
        ) from error
    return image


def _row_images(row: dict, column: str, where: str) -> list:
    """The images of one row, loaded: `images` holds a list (None or [] for none), `image` one image (or None).
    `where` names the row in errors."""
    value = row.get(column)
    if value is None:
        return []
    values = list(value) if column == "images" and isinstance(value, (list, tuple)) else [value]
    return [load_image(v, f"{where}, column '{column}'") for v in values]


def with_images(prompts: list, rows: list[dict]) -> list:
    """The prompts with each row's images as image parts (TRL's `prepare_multimodal_messages`); the prompts as they
    are when the rows have no image column (or there are none). Conversational prompts only, as in TRL."""
    from trl.data_utils import prepare_multimodal_messages

    column = image_column(rows[0]) if rows else None
    if column is None:
        return prompts
    images = [_row_images(row, column, f"row {i} of the batch") for i, row in enumerate(rows)]
    if not any(images):
        return prompts
    result = []
    for i, (prompt, row_images) in enumerate(zip(prompts, images, strict=True)):
        if not (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            raise ValueError(  # TRL's message first
                "Multimodal training requires conversational prompts. It looks like the dataset contains "
                "non-conversational inputs, likely because a chat template was applied before passing the dataset "
                f"to the trainer. Row {i} of the batch has a text prompt and an '{column}' column: write the prompt "
                'as messages, e.g. [{"role": "user", "content": "What is in the image?"}].'
            )
        try:
            result.append(prepare_multimodal_messages(prompt, images=row_images))
        except ValueError as error:  # more (or fewer) images than {"type": "image"} placeholders
            raise ValueError(
                f"Row {i} of the batch: {error} The prompt's image parts ({{'type': 'image'}}) take the images of "
                f"column '{column}' in order: give one placeholder per image, or write the user message's content as "
                "a string to have the images put before its text."
            ) from None
    return result


def prompt_images(prompt) -> list:
    """The images in a conversational prompt's image parts, in order."""
    if not isinstance(prompt, list):
        return []
    return [
        part["image"]
        for message in prompt
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image" and part.get("image") is not None
    ]


def has_images(prompts: list) -> bool:
    return any(prompt_images(prompt) for prompt in prompts)


@dataclass
class VisionInputs:
    """The processor's model-specific tensors of a batch of rows, one dict per row (the rows of a group share one
    dict). Each row's tensors are those of its own images (first dimension: its images, or their patches) or of its
    own prompt tokens (`TOKEN_ALIGNED`, `(1, P_i)`), so rows are selected and concatenated as a list, with no rule
    per architecture, and batched only when a model is called (`model_inputs`)."""

    rows: list[dict[str, torch.Tensor]]

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, rows: slice | torch.Tensor) -> VisionInputs:
        """The given rows (a slice, or row indices `(b,)`)."""
        if isinstance(rows, slice):
            return VisionInputs(self.rows[rows])
        return VisionInputs([self.rows[i] for i in rows.tolist()])

    def followed_by(self, lengths: list[int]) -> VisionInputs:
        """These rows with `lengths[i]` text tokens after row i's prompt (a tool-calling history: the completion so
        far), so that per-token tensors stay aligned with their prompt tokens (0 over the text after them)."""
        rows = []
        for row, length in zip(self.rows, lengths, strict=True):
            rows.append(
                {
                    key: torch.cat([value, value.new_zeros(value.size(0), length)], 1)
                    if key in TOKEN_ALIGNED
                    else value
                    for key, value in row.items()
                }
            )
        return VisionInputs(rows)

    @classmethod
    def concat(cls, parts: list[VisionInputs]) -> VisionInputs:
        return cls([row for part in parts for row in part.rows])

    def model_inputs(self, prompt_width: int, completion_width: int, device) -> dict[str, torch.Tensor]:
        """The keyword arguments of a forward (or `generate`) over these rows' left-padded prompts `(b, P)` followed
        by `completion_width` completion columns: per-image tensors concatenated over the rows' images in row
        order (zero-padded to one shape where rows differ in images or tiles, `_cat_padded`), per-token ones
        `(b, P + C)` left-padded with 0 to the prompt width and 0 on the completion."""
        inputs = {}
        keys = dict.fromkeys(key for row in self.rows for key in row)
        for key in keys:
            if key in TOKEN_ALIGNED:
                width = prompt_width + completion_width
                values = torch.zeros(len(self.rows), width, dtype=torch.long)  # (b, P + C)
                for i, row in enumerate(self.rows):
                    if key in row:
                        row_values = row[key][0]  # (P_i,)
                        values[i, prompt_width - row_values.numel() : prompt_width] = row_values
                inputs[key] = values.to(device)
            else:  # images (or their patches) of every row, in row order
                inputs[key] = _cat_padded([row[key] for row in self.rows if key in row]).to(device)
        return inputs


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated over their first dimension, each zero-padded at the end of its other dimensions to the
    largest, as a processor pads the images of a batch: Idefics3's `(1, images, 3, H, W)` to the most images per
    prompt (an all-zero image is dropped by the model), LLaVA-NeXT's `(images, tiles, 3, H, W)` to the most tiles (the
    model reads each image's own from `image_sizes`)."""
    shape = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors), strict=True)]
    if all(list(t.shape[1:]) == shape for t in tensors):
        return torch.cat(tensors)
    result = tensors[0].new_zeros(sum(len(t) for t in tensors), *shape)
    start = 0
    for t in tensors:
        result[(slice(start, start + len(t)), *(slice(0, size) for size in t.shape[1:]))] = t
        start += len(t)
    return result


def check_vision_setup(model, processing_class, train_dataset, eval_dataset, rollout_func=None) -> None:
    """At trainer start: a dataset with an image column needs a processor and a vision-language model, and its first
    row's images must open (every row's are loaded at its rollout); a processor needs a model that takes images; a
    `rollout_func` is refused beside an image column (grpo-ext scores images its own generation encoded)."""
    datasets = {"train_dataset": train_dataset}
    for split, dataset in eval_dataset.items() if isinstance(eval_dataset, dict) else [("", eval_dataset)]:
        datasets[f"eval_dataset[{split!r}]" if split else "eval_dataset"] = dataset
    for name, dataset in datasets.items():
        if dataset is None:
            continue
        first_row = next(iter(dataset), None)
        column = image_column(getattr(dataset, "column_names", None) or first_row or [])
        if column is None:
            continue
        if processing_class is None or not is_processor(processing_class):
            given = "no processing_class" if processing_class is None else f"a {type(processing_class).__name__}"
            raise ValueError(
                f"{name} has an '{column}' column but the trainer got {given}, not a processor: images need the "
                "model's processor, which turns them into pixel values and image tokens. Pass "
                "processing_class=AutoProcessor.from_pretrained(<model id>), or drop the column for text-only training."
            )
        if not is_vision_model(model):
            raise ValueError(
                f"{name} has an '{column}' column but {type(model).__name__} takes no images (its config has no "
                "vision_config). Load the vision-language model (e.g. AutoModelForImageTextToText.from_pretrained), "
                "or drop the column for text-only training."
            )
        if rollout_func is not None:
            raise NotImplementedError(
                f"{name} has an '{column}' column and the trainer got a rollout_func: rollouts with images are "
                "generated (with tools and environments too) and scored by grpo-ext's own generation only, for now. "
                f"Drop the rollout_func for this dataset, or the '{column}' column for a text-only custom rollout."
            )
        if first_row is not None:
            _row_images(first_row, column, f"{name} row 0")
    if is_processor(processing_class) and not is_vision_model(model):
        raise ValueError(
            f"processing_class is a {type(processing_class).__name__} (a multimodal processor) but "
            f"{type(model).__name__} takes no images (its config has no vision_config). Pass the model's tokenizer "
            "for a text-only model, or load the vision-language model."
        )
