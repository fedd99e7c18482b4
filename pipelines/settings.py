"""Runtime settings that configuration code can import without loading torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InferenceSettings:
    """The ``[inference]`` table of the node's config (documented in conf/node.toml)."""

    device: str = "auto"  # auto | cpu | cuda
    batch_size: int = 8
    patch_size: int = 0  # 0 = whole slices; >0 = square tiles with overlap
    patch_overlap: int = 32  # raised (and patch_size with it) to what the model's receptive
    #                          field needs for seam-free tiles (pipelines.inference.plan_tiles)
    bf16: bool = True
    threads: int = 0  # CPU threads for torch; 0 = torch's default
