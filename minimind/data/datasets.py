"""Training datasets over prepared shards, and the collate functions that batch them.

Pretraining packs the token stream into full rows (no padding at all); SFT packs whole conversations into
rows and keeps them apart with `doc_ids` (the objective passes them to the model as `document_ids`: attention
and positions per conversation, so packed samples never see each other); DPO and RL pad each batch only to its
own longest sample. Every item is computed from its index alone, so a resumed run rebuilds any batch exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from minimind.data.shards import Shard
from minimind.errors import UserError


class PackedPretrainDataset(Dataset):
    """Row i = tokens [i·T, i·T + T + 1) of the stream of `<s>doc</s>` documents; X = row[:-1], Y = row[1:].

    Documents run into each other inside a row (GPT-style packing); attention crosses document boundaries
    unless `doc_mask` is set, in which case positions restart at every `<s>` and attention stays inside a
    document, at the cost of an explicit mask.
    """

    def __init__(self, shard: Shard, seq_len: int, bos_id: int = 1, doc_mask: bool = False):
        self.shard, self.seq_len, self.bos_id, self.doc_mask = shard, seq_len, bos_id, doc_mask
        self.n_rows = (shard.meta["n_tokens"] - 1) // seq_len
        if self.n_rows < 1:
            raise UserError(f"{shard.dir}: {shard.meta['n_tokens']} tokens cannot fill one row of {seq_len + 1}")

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.seq_len
        row = torch.from_numpy(np.asarray(self.shard.tokens()[start : start + self.seq_len + 1], dtype=np.int64))
        item = {"input_ids": row[:-1], "labels": row[1:], "loss_mask": torch.ones(self.seq_len, dtype=torch.float32)}
        if self.doc_mask:
            item["doc_ids"] = torch.cumsum(row[:-1] == self.bos_id, 0)
        return item


class PackedSFTDataset(Dataset):
    """Conversations packed in file order (next-fit) into rows of T + 1 tokens, padding only the tail.

    A conversation longer than T + 1 is cut to T + 1 tokens; its mask is cut with it (the mask was computed
    on the whole conversation, so a cut never leaves a target on a half header). A conversation whose
    targets all fall beyond the cut is dropped and counted in `dropped`.
    """

    def __init__(self, shard: Shard, seq_len: int, pad_id: int = 0):
        if not shard.meta.get("has_mask"):
            raise UserError(f"{shard.dir}: prepared without loss masks; prepare it with --kind sft")
        self.shard, self.seq_len, self.pad_id = shard, seq_len, pad_id
        cap = seq_len + 1
        rows, current, used, self.dropped = [], [], 0, 0
        for i, length in enumerate(shard.lengths()):
            n = min(int(length), cap)
            _, mask = shard.sample(i)
            if not mask[1:n].any():
                self.dropped += 1
                continue
            if current and used + n > cap:
                rows.append(current)
                current, used = [], 0
            current.append((i, n))
            used += n
        if current:
            rows.append(current)
        if not rows:
            raise UserError(f"{shard.dir}: no conversation has an assistant target within {cap} tokens")
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> dict[str, torch.Tensor]:
        t = self.seq_len
        ids = np.full(t + 1, self.pad_id, dtype=np.int64)
        mask = np.zeros(t + 1, dtype=np.float32)
        docs = np.full(t + 1, -1, dtype=np.int64)  # -1 = padding
        pos = 0
        for doc, (i, n) in enumerate(self.rows[r]):
            sample_ids, sample_mask = self.shard.sample(i)
            ids[pos : pos + n] = sample_ids[:n]
            mask[pos : pos + n] = sample_mask[:n]
            mask[pos] = 0  # a document's first token has nothing before it in its own document to predict it
            docs[pos : pos + n] = doc
            pos += n
        ids_t, docs_t = torch.from_numpy(ids), torch.from_numpy(docs)
        return {"input_ids": ids_t[:-1], "labels": ids_t[1:], "loss_mask": torch.from_numpy(mask[1:]),
                "doc_ids": docs_t[:-1]}


class PairDataset(Dataset):
    """DPO pairs: samples 2i (chosen) and 2i+1 (rejected) of a `dpo` shard, each cut to T + 1 tokens."""

    def __init__(self, shard: Shard, seq_len: int):
        if shard.kind != "dpo":
            raise UserError(f"{shard.dir}: expected dpo data, got {shard.kind!r}")
        self.shard, self.seq_len = shard, seq_len

    def __len__(self) -> int:
        return len(self.shard) // 2

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        cap = self.seq_len + 1
        (c_ids, c_mask), (r_ids, r_mask) = self.shard.sample(2 * i), self.shard.sample(2 * i + 1)
        return {"chosen": (c_ids[:cap], c_mask[:cap]), "rejected": (r_ids[:cap], r_mask[:cap])}


class PromptDataset(Dataset):
    """RL prompts (`rlaif` shard): prompt token ids (cut from the left to T) with the reference answer."""

    def __init__(self, shard: Shard, max_prompt_len: int):
        if shard.kind != "rlaif":
            raise UserError(f"{shard.dir}: expected rlaif data, got {shard.kind!r}")
        self.shard, self.max_prompt_len = shard, max_prompt_len

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, i: int) -> dict:
        ids, _ = self.shard.sample(i)
        extra = self.shard.extra(i)
        return {"prompt_ids": ids[-self.max_prompt_len :].tolist(), "answer": extra["answer"],
                "prompt": extra["prompt"]}

    def unanswered(self) -> int:
        """How many prompts came without a reference answer (see `validate_rlaif`)."""
        return sum(not self.shard.extra(i)["answer"] for i in range(len(self)))


def stack_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Fixed-length items (the packed datasets) -> a batch."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def pad_sequences(seqs: list[tuple[np.ndarray, np.ndarray]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """(ids, mask) sequences -> right-padded X, Y, loss_mask and attention_mask of the batch's own length."""
    width = max(len(ids) for ids, _ in seqs) - 1
    batch = {
        "input_ids": torch.full((len(seqs), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(seqs), width), pad_id, dtype=torch.long),
        "loss_mask": torch.zeros(len(seqs), width),
        "attention_mask": torch.zeros(len(seqs), width, dtype=torch.long),
    }
    for row, (ids, mask) in enumerate(seqs):
        n = len(ids) - 1
        batch["input_ids"][row, :n] = torch.as_tensor(ids[:-1])
        batch["labels"][row, :n] = torch.as_tensor(ids[1:])
        batch["loss_mask"][row, :n] = torch.from_numpy(np.asarray(mask[1:], dtype=np.float32))
        batch["attention_mask"][row, :n] = 1
    return batch


def pair_collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """DPO: chosen rows first, then rejected rows, in one batch (MiniMind2's single-forward layout)."""
    return pad_sequences([item["chosen"] for item in items] + [item["rejected"] for item in items])


def prompt_collate(items: list[dict]) -> dict:
    return {key: [item[key] for item in items] for key in items[0]}
