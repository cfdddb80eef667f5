"""Training examples from cached hidden states.

A features shard holds, per answer position j of each sequence: ``hidden[j]`` (d,), the
backbone state whose LM-head argmax is answer token j (the backbone's "t+1"), and
``tokens[j]``. For a head with target offset o (o = 2 under Backbone-as-Architect: head i
-> t+1+i), the target of head i at j is tokens[j + o - 2 + i], when the sequence is that
long.

Splits, by sequence: ``heldout`` (the held-out rule's, datasets.sharegpt_split: every
evaluation), and the rest split again into ``heads`` (trains the heads) and ``predictor``
(trains CLP and the gates on head predictions the heads were not fitted to, so that their
labels are honest).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ClpError

IGNORE = -100


@dataclass
class Features:
    hidden: torch.Tensor  # (N, d) fp16
    tokens: torch.Tensor  # (N,) answer tokens; tokens[j] is the backbone's t+1 at row j
    seq: torch.Tensor  # (N,) sequence id (negative: teacher-forced ShareGPT text)
    split: np.ndarray  # (N,) "heads" | "predictor" | "heldout"
    on_path: torch.Tensor  # (N,) bool: the sequence's next row follows the backbone's greedy choice

    def targets(self, k: int, offset: int = 2) -> torch.Tensor:
        """(N, k) target token of head i at each row.

        IGNORE past the sequence end, and where the sequence left the backbone's greedy
        path before the target (teacher-forced text), since the target is then unknown.
        """
        n = len(self.tokens)
        out = torch.full((n, k), IGNORE, dtype=torch.long)
        valid = torch.ones(n, dtype=torch.bool)  # chain from j to j+shift is on the path
        shift_done = 0
        for i in range(k):
            shift = offset - 1 + i  # rows ahead of j holding head i's target
            while shift_done < shift:
                s = shift_done
                step = torch.zeros(n, dtype=torch.bool)
                step[: n - s - 1] = (self.seq[s + 1 :] == self.seq[: n - s - 1]) & self.on_path[s : n - 1]
                valid &= step
                shift_done += 1
            if shift == 0:
                out[:, i] = self.tokens
                continue
            tgt = torch.full((n,), IGNORE, dtype=torch.long)
            tgt[: n - shift] = self.tokens[shift:]
            out[:, i] = torch.where(valid, tgt, torch.tensor(IGNORE))
        return out

    def rows(self, split: str) -> torch.Tensor:
        return torch.from_numpy(np.nonzero(self.split == split)[0])


def sequence_states(feats: Features, split: str) -> list[tuple]:
    """The rows of a split as whole sequences, in the layout of heads.accuracy.heldout_states:
    [(states (1, n+1, d), ids (1, n+1), answer_mask (1, n+1))], one per sequence.

    Row j's state is the one whose next token is answer token j, so at position j of that
    layout ids[j+1] = tokens[j]. ids[0] (the prompt's last token, not cached) and the state
    at position n (none: the answer has ended) are padding that no draft reads or scores.
    """
    rows = feats.rows(split)
    # A sequence's rows are consecutive (as Features.targets assumes).
    _, counts = torch.unique_consecutive(feats.seq[rows], return_counts=True)
    out = []
    for seq_rows in torch.split(rows, counts.tolist()):
        n = len(seq_rows)
        states = torch.zeros(1, n + 1, feats.hidden.shape[1])
        states[0, :n] = feats.hidden[seq_rows].float()
        ids = torch.zeros(1, n + 1, dtype=torch.long)
        ids[0, 1:] = feats.tokens[seq_rows]
        mask = torch.zeros(1, n + 1, dtype=torch.bool)
        mask[0, :n] = True
        out.append((states, ids, mask))
    return out


SOURCES = ("all", "distilled", "teacher")


def load_features(features_dir: Path, predictor_share: float = 0.2, sources: str = "all") -> Features:
    """Load cached hidden states. `sources`: all, distilled (self-generated answers only) or
    teacher (teacher-forced ShareGPT only, plus the distilled rows CLP and evaluation need)."""
    if sources not in SOURCES:
        raise ClpError(f"sources must be one of {', '.join(SOURCES)}")
    from .distill import check_features_rule

    check_features_rule(features_dir)  # held-out flags of today's rule, or a clear error
    # Self-distilled shards are always read: even "teacher" needs them for CLP and evaluation.
    shards = sorted(Path(features_dir).glob("shard-*.npz"))
    shards += sorted(Path(features_dir).glob("tf-*.npz")) if sources != "distilled" else []
    if not shards:
        raise ClpError(f"no cached hidden states in {features_dir}: run `clp distill` first")
    parts = [np.load(s) for s in shards]
    hidden = np.concatenate([p["hidden"] for p in parts])
    tokens = np.concatenate([p["tokens"] for p in parts]).astype(np.int64)
    seq = np.concatenate([p["seq"] for p in parts]).astype(np.int64)
    heldout = np.concatenate([p["heldout"] for p in parts])
    on_path = np.concatenate([p["on_path"] if "on_path" in p else np.ones(len(p["tokens"]), bool) for p in parts])
    # Every n-th self-distilled training sequence (by id) trains CLP and the gates: the same
    # ones on every run. Teacher-forced rows (seq < 0) never do: their labels are partial.
    own = np.unique(seq[(seq >= 0) & ~heldout])
    every = max(1, round(1 / predictor_share)) if predictor_share > 0 else 0
    predictor = np.isin(seq, own[::every]) if every else np.zeros(len(seq), bool)
    split = np.where(heldout, "heldout", np.where(predictor, "predictor", "heads"))
    if sources == "teacher":  # distilled sequences may serve CLP and evaluation, not the heads
        split = np.where((seq >= 0) & (split == "heads"), "unused", split)
    return Features(torch.from_numpy(hidden), torch.from_numpy(tokens), torch.from_numpy(seq), split,
                    torch.from_numpy(on_path))


def draft_vocabulary(tokens: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent answer tokens (all tokens when size is 0), sorted by id."""
    if size <= 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.bincount(tokens, minlength=vocab_size)
    top = counts.argsort(descending=True)[:size]
    return top.sort().values


def to_draft_index(targets: torch.Tensor, draft_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Map backbone token ids to draft-vocabulary indices; tokens outside -> IGNORE."""
    lut = torch.full((vocab_size,), IGNORE, dtype=torch.long)
    lut[draft_ids] = torch.arange(len(draft_ids))
    out = torch.full_like(targets, IGNORE)
    valid = targets >= 0
    out[valid] = lut[targets[valid]]
    return out
