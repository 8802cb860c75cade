"""What a dual encoder is scored by, on the held-out split.

* Zero-shot top-1 (CLIP, Radford et al. 2021, and its prompt-ensembling notebook): each class's prompts (every
  template with the class name) are embedded and L2-normalised, averaged over the templates and normalised again;
  an image is assigned the class whose mean text embedding has the largest cosine similarity.
* Image-text retrieval recall R@1/5/10 both ways on held-out pairs, one caption per image (its first): image to
  text, the share of images whose own caption is among the K captions most similar to it; text to image, the
  share of captions whose own image is among the K most similar images.  The pairs are the whole held-out split
  or a subset of it drawn once with a fixed seed (``train.retrieval_pairs``).  A candidate outranks the true match only
  with a strictly larger similarity, so a caption identical to the true one (class-name captions repeat across
  images) ties with it and counts as found: with templated class captions, image-to-text recall is a class-level
  recall.

The metric functions are pure (embeddings in, numbers out); `evaluate_encoder` embeds the split and calls them.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .data import ClipData, PairSplit

RECALL_KS = (1, 5, 10)
SIMILARITY_ROWS = 1024  # rows of the similarity matrix computed at once
RETRIEVAL_SEED = 0  # which held-out pairs the retrieval recall uses when it uses a subset


def class_embeddings(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """(C, D) zero-shot classifier from (C, T, D) prompt embeddings: normalise each, mean over T, normalise."""
    return F.normalize(F.normalize(prompt_embeds, dim=-1).mean(dim=1), dim=-1)


def zero_shot_top1(image_embeds: torch.Tensor, class_weights: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of assigning each image the class of largest cosine similarity
    (``argmax_c <normalize(image), class_weights[c]>``)."""
    scores = F.normalize(image_embeds, dim=-1) @ class_weights.T
    return 100.0 * (scores.argmax(dim=1) == labels).double().mean().item()


def retrieval_ranks(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image-to-text ranks, text-to-image ranks) of N pairs (row i of each is pair i): the rank of image i's own
    caption is the number of captions with a strictly larger similarity to image i (0: first), and likewise for
    text i's own image.  Similarities are computed in blocks of rows, the same blocks in both passes, so the true
    pairs' similarities are the very values compared."""
    images, texts = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
    n = len(images)
    blocks = [slice(start, min(start + SIMILARITY_ROWS, n)) for start in range(0, n, SIMILARITY_ROWS)]
    true = torch.empty(n, dtype=images.dtype, device=images.device)
    image_ranks = torch.empty(n, dtype=torch.long, device=images.device)
    for block in blocks:
        scores = images[block] @ texts.T
        rows = torch.arange(block.start, block.stop, device=images.device)
        true[block] = scores[rows - block.start, rows]
        image_ranks[block] = (scores > true[block, None]).sum(dim=1)
    text_ranks = torch.zeros(n, dtype=torch.long, device=images.device)
    for block in blocks:
        text_ranks += (images[block] @ texts.T > true[None, :]).sum(dim=0)
    return image_ranks, text_ranks


def retrieval_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                     ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """``i2t_r{K}`` and ``t2i_r{K}`` (%) of N pairs (see `retrieval_ranks`), and ``mean_recall`` over them all."""
    image_ranks, text_ranks = retrieval_ranks(image_embeds, text_embeds)
    out = {}
    for name, ranks in (("i2t", image_ranks), ("t2i", text_ranks)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


# ---------------------------------------------------------------- embedding a split


@torch.no_grad()
def embed_images(encoder: Any, split: PairSplit, rows: torch.Tensor, batch_size: int,
                 device: torch.device) -> torch.Tensor:
    """L2-normalised image embeddings (float32, CPU) of `split`'s `rows`."""
    out = [encoder.encode_image(split.images_at(rows[i:i + batch_size]).to(device)).float().cpu()
           for i in range(0, len(rows), batch_size)]
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def embed_captions(encoder: Any, tokens: tuple[torch.Tensor, torch.Tensor], indices: torch.Tensor, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """L2-normalised text embeddings (float32, CPU) of the captions `indices` (rows of the token table `tokens`)."""
    ids, mask = tokens
    out = []
    for i in range(0, len(indices), batch_size):
        chosen = indices[i:i + batch_size].to(ids.device)
        out.append(encoder.encode_text(ids[chosen].to(device), mask[chosen].to(device)).float().cpu())
    return F.normalize(torch.cat(out), dim=-1)


def retrieval_rows(size: int, count: int) -> torch.Tensor:
    """The held-out rows of the retrieval pairs: all (`count` 0 or >= `size`), or `count` of them drawn once with a
    fixed seed (in order), so that a split sorted by class (an image folder) is not scored on one class."""
    if not count or count >= size:
        return torch.arange(size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(RETRIEVAL_SEED))[:count].sort().values


def evaluate_encoder(encoder: Any, tokens: tuple[torch.Tensor, torch.Tensor], data: ClipData, batch_size: int,
                     retrieval_pairs: int, device: torch.device) -> dict[str, float]:
    """``test_zeroshot_top1`` (a labelled dataset, every held-out image) and ``test_i2t_r1`` ... ``test_t2i_r10``,
    ``test_mean_recall`` on `retrieval_pairs` held-out pairs (`retrieval_rows`; 0: all).  `tokens`: the caption
    pool's (ids, mask) for the encoder's tokenizer."""
    was_training = encoder.training
    encoder.eval()
    try:
        test = data.test
        metrics = {}
        rows = retrieval_rows(len(test), retrieval_pairs)
        labelled = data.class_names is not None
        image_embeds = embed_images(encoder, test, torch.arange(len(test)) if labelled else rows, batch_size, device)
        if labelled:
            prompts = data.prompt_indices()
            prompt_embeds = embed_captions(encoder, tokens, prompts.flatten(), batch_size, device)
            weights = class_embeddings(prompt_embeds.view(*prompts.shape, -1))
            metrics["test_zeroshot_top1"] = zero_shot_top1(image_embeds, weights, test.labels)
            image_embeds = image_embeds[rows]
        recall = retrieval_recall(image_embeds,
                                  embed_captions(encoder, tokens, test.first_captions()[rows], batch_size, device))
        metrics.update({f"test_{key}": value for key, value in recall.items()})
        return metrics
    finally:
        encoder.train(was_training)


__all__ = ["class_embeddings", "zero_shot_top1", "retrieval_ranks", "retrieval_recall", "retrieval_rows",
           "embed_images", "embed_captions", "evaluate_encoder", "RECALL_KS"]
