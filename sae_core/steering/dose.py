"""Steering measured, not hoped for: a dose-response sweep of one latent over coefficients.

For each coefficient c the prompts are generated in one batch (:class:`ModelSteering`, greedy
unless told otherwise, one seed for every coefficient) with latent i's decoder direction added at c
on every position (``add`` mode), and each generation is scored on its generated tokens only:

* **concept score**: the fraction of generated tokens on which latent i fires (z_i != 0) when the
  generated text, prompt included as context, is run through the *unsteered* model and encoded by
  the SAE. It asks whether the text itself carries the concept, not whether the steered
  activations do (they do by construction).
* **top-token probability**: the mean, over the generation's next-token distributions (those of the
  steered model, from which the tokens were drawn), of the probability mass on the latent's top
  tokens (the tokens it fires on most strongly in the held-out analysis).
* **perplexity**: exp of the mean negative log-likelihood of the generated tokens under the
  unsteered model, each predicted from its own prefix (coherence: still text the model finds
  plausible?).
* **distinct fraction**: distinct tokens of each generation over its length, pooled over the
  prompts (sum of each prompt's distinct count / all generated tokens). Perplexity cannot tell
  repetition from text: once a run of one token has started, the model predicts its next copy
  with confidence, so on SmolLM2 sixteen ``'-'`` score perplexity 3.5, below the unsteered greedy
  completion's 3.7, and ``' very'`` sixteen times 4.7. A generation that repeats one token has a
  distinct fraction of 1/16; the unsteered completions of the default prompts ~0.77.

Decisions:

* Scores are pooled over every generated token of every prompt (a prompt that stops early at EOS
  weighs less), rather than averaged per prompt: a per-prompt mean lets a 1-token completion count
  as much as a 16-token one.
* c = 0 is run as a steer of zero, which ``add`` applies as an exact no-op, so the 0 record is the
  unsteered run bit for bit (a test checks it against a plain ``model.generate``); every other
  record is compared with it.
* Coefficients are absolute. The pipeline passes multiples of the latent's mean activation when it
  fires (``STEERING['coefficients']``): in those units the direction's size is the latent's own
  typical contribution, where the residual norm (the single-example ``coefficient``) is ~20x larger
  than any one latent and turns every completion into repetition.
* After generation, the sequences are scored in two padded forwards (unsteered with a cache at the
  hook, steered for the top-token probability), right-padded with an explicit attention mask, so
  no pad is read by id (SmolLM2's pad id is its EOS id) and real tokens never attend to pads.
* Which latents to sweep: an interpretable latent (density band, distinct word tokens) is not
  enough, since a latent that fires on a concept need not write it. :func:`screen_latents` ranks
  candidates by their output score (one steered forward each, no generation), so the sweep, which
  generates at every coefficient, starts with the latents whose direction makes the model predict
  their own tokens.
* :func:`choose_coefficient` picks the coefficient that raises the concept score most while the
  perplexity stays within ``max_perplexity_ratio`` of the unsteered text and the distinct
  fraction at least ``min_distinct_ratio`` of its; ``None`` when none does (reported, never
  replaced by a coefficient that breaks the text). Relative to the unsteered run, since greedy
  decoding of a small model repeats itself too (the default prompts' unsteered completions
  repeat whole phrases).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from sae_core.latents import LatentCSR, top_activating_examples
from sae_core.steering.generation import ModelSteering, SteeredGeneration
from sae_core.steering.registry import Steer


class DoseRecord(NamedTuple):
    """The scores of one coefficient (definitions in the module docstring)."""

    coefficient: float
    concept_score: float
    top_token_probability: float
    perplexity: float
    distinct_fraction: float

    def to_json(self) -> dict[str, float]:
        return {name: float(value) for name, value in self._asdict().items()}


class DoseResponse(NamedTuple):
    """A sweep: one record and one generation per coefficient, in the order given."""

    hook: str
    feature: int
    prompts: list[str]
    top_token_ids: list[int]
    records: list[DoseRecord]
    generations: list[SteeredGeneration]

    def record_of(self, coefficient: float) -> DoseRecord:
        return self.records[self.index_of(coefficient)]

    def index_of(self, coefficient: float) -> int:
        return [r.coefficient for r in self.records].index(coefficient)


def padded(sequences: Sequence[Int[Tensor, " pos"]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded (batch, pos) tokens and their attention mask (1 on real tokens)."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)], mask[row, :len(seq)] = seq, 1
    return tokens, mask


def generated_mask(generation: SteeredGeneration, width: int) -> Tensor:
    """(batch, width) True at the positions that hold generated tokens."""
    pos = torch.arange(width)[None, :]
    lengths = torch.tensor([len(t) for t in generation.tokens])[:, None]
    starts = torch.tensor(generation.prompt_lengths)[:, None]
    return (pos >= starts) & (pos < lengths)


def distinct_fraction(generation: SteeredGeneration) -> float:
    """Distinct generated tokens of each prompt, summed, over all generated tokens (nan: none generated)."""
    generated = [tokens[start:].tolist()
                 for tokens, start in zip(generation.tokens, generation.prompt_lengths, strict=True)]
    total = sum(len(g) for g in generated)
    return sum(len(set(g)) for g in generated) / total if total else float("nan")


def score_generation(steering: ModelSteering, hook: str, feature: int, generation: SteeredGeneration,
                     top_token_ids: Sequence[int], coefficient: float) -> DoseRecord:
    """Concept score, top-token probability, perplexity and distinct fraction of ``generation``
    (made with ``coefficient``)."""
    model = steering.model
    tokens, mask = padded(generation.tokens, model.tokenizer.pad_token_id or 0)
    tokens, mask = tokens.to(model.cfg.device), mask.to(model.cfg.device)
    generated = generated_mask(generation, tokens.shape[1]).to(tokens.device)  # (batch, pos)
    predicts = generated[:, 1:]  # (batch, pos-1): logits at p predict the generated token at p + 1
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=[hook])
        latent = steering.manager.encode(hook, cache[hook][generated])[:, feature]  # (n_generated,)
        log_probs = F.log_softmax(logits[:, :-1][predicts].double(), dim=-1)  # (n_generated, vocab)
        nll = -log_probs.gather(-1, tokens[:, 1:][predicts][:, None]).mean()
        with steering.steer(hook, feature, coefficient):
            steered = model(tokens, attention_mask=mask)[:, :-1][predicts].double().softmax(-1)
        ids = torch.tensor(sorted(set(top_token_ids)), dtype=torch.long, device=steered.device)
        top_probability = steered[:, ids].sum(-1).mean() if len(ids) else torch.tensor(float("nan"))
    return DoseRecord(float(coefficient), float((latent != 0).double().mean()), float(top_probability),
                      float(torch.exp(nll)), distinct_fraction(generation))


def dose_response(steering: ModelSteering, hook: str, feature: int, coefficients: Sequence[float],
                  prompts: Sequence[str], top_token_ids: Sequence[int], *, max_new_tokens: int = 16,
                  seed: int | None = 0, **generation_kwargs: Any) -> DoseResponse:
    """Generate ``prompts`` (one batch) at each coefficient and score them (:func:`score_generation`).

    ``generation_kwargs`` go to :meth:`ModelSteering.generate_with_steering` (``do_sample``, ...);
    every coefficient uses the same ``seed``.
    """
    if steering.registry.handles:
        raise RuntimeError("steers are active, so every coefficient would be steered by them too; close "
                           "their contexts or call clear_steering() first")
    if not coefficients or 0.0 not in [float(c) for c in coefficients]:
        raise ValueError(f"coefficients {list(coefficients)} must include 0.0: the unsteered run every "
                         "other coefficient is compared with")
    records, generations = [], []
    for coefficient in coefficients:
        generation = steering.generate_with_steering(list(prompts), [Steer(hook, feature, float(coefficient))],
                                                     max_new_tokens=max_new_tokens, seed=seed, **generation_kwargs)
        generations.append(generation)
        records.append(score_generation(steering, hook, feature, generation, top_token_ids, coefficient))
    return DoseResponse(hook, feature, list(prompts), sorted(set(top_token_ids)), records, generations)


def choose_coefficient(records: Sequence[DoseRecord], max_perplexity_ratio: float = 2.0,
                       min_distinct_ratio: float = 0.5) -> DoseRecord | None:
    """The record whose concept score rises most above the unsteered one (coefficient 0) while its
    perplexity stays within ``max_perplexity_ratio`` times the unsteered perplexity and its distinct
    fraction at least ``min_distinct_ratio`` times the unsteered one (not repetition; ties: the
    smaller coefficient); None if no coefficient raises it within those limits."""
    baseline = next((r for r in records if r.coefficient == 0.0), None)
    if baseline is None:
        raise ValueError("no record of coefficient 0.0, the unsteered baseline; include 0.0 in the coefficients")
    allowed = [r for r in records if coherent(r, baseline, max_perplexity_ratio, min_distinct_ratio)
               and r.concept_score > baseline.concept_score]
    return min(allowed, key=lambda r: (-r.concept_score, abs(r.coefficient)), default=None)


def coherent(record: DoseRecord, baseline: DoseRecord, max_perplexity_ratio: float = 2.0,
             min_distinct_ratio: float = 0.5) -> bool:
    """Whether ``record``'s text passes both coherence limits relative to the unsteered ``baseline``."""
    return (record.perplexity <= max_perplexity_ratio * baseline.perplexity
            and record.distinct_fraction >= min_distinct_ratio * baseline.distinct_fraction)


class LatentChoice(NamedTuple):
    """An interpretable latent to steer with, and what the choice read."""

    feature: int
    density: float
    mean_activation: float
    """Mean of the latent's non-zero activations on the analysed tokens (the coefficients' unit)."""
    top_token_ids: list[int]
    """Distinct tokens of its top-activating examples, strongest first."""
    output_score: float | None = None
    """What adding its decoder direction does to the model's output (:func:`screen_latents`); None: not screened."""


def describe_latent(csr: LatentCSR, density: np.ndarray, feature: int, examples: Sequence[Any] | None = None,
                    matrix: Any = None, k: int = 10) -> LatentChoice:
    """:class:`LatentChoice` of a given latent: its density, mean non-zero activation and distinct top tokens."""
    if not 0 <= feature < csr.n_features:
        raise IndexError(f"latent {feature} is outside the SAE's {csr.n_features} latents")
    column = (csr.to_scipy().tocsc() if matrix is None else matrix)[:, feature]
    if examples is None:
        examples = top_activating_examples(csr, [feature], k=k, context_window=0)[feature]
    tokens = list(dict.fromkeys(int(ex.context_token_ids[ex.focus]) for ex in examples))
    mean = float(column.sum() / column.nnz) if column.nnz else 0.0
    return LatentChoice(int(feature), float(density[feature]), mean, tokens)


def word_tokens(token_ids: Sequence[int], decode: Callable[[int], str] | None) -> list[int]:
    """The tokens that decode to a word (3+ letters once stripped); every token without ``decode``."""
    if decode is None:
        return list(token_ids)
    return [t for t in token_ids if len(decode(t).strip()) >= 3 and decode(t).strip().isalpha()]


def interpretable_latents(csr: LatentCSR, density: np.ndarray, band: tuple[float, float] = (1e-3, 0.05),
                          min_distinct_tokens: int = 3, k: int = 10, n_candidates: int = 64,
                          decode: Callable[[int], str] | None = None, count: int = 1) -> list[LatentChoice]:
    """Up to ``count`` latents, most strongly firing first, whose density lies in ``band`` and whose
    ``k`` top-activating examples fire on at least ``min_distinct_tokens`` distinct tokens (a concept,
    not one token).

    With ``decode`` (token id -> text), only words count, and at least half of the examples must
    fire on one: the strongest latents of a residual stream are often high-norm ones that fire on
    fragments and digits (" farther", "sa", "7", "Z"), which count as distinct tokens too but name
    no concept, while concept latents fire on words (" Thoreau", " Twain", " Emerson").
    Candidates are the ``n_candidates`` of the band with the largest maximum activation; raises,
    naming the knobs, when none qualifies.
    """
    matrix = csr.to_scipy().tocsc()  # (rows, d_sae)
    max_activation = np.asarray(abs(matrix).max(axis=0).todense()).ravel()
    in_band = np.flatnonzero((density >= band[0]) & (density <= band[1]))
    candidates = in_band[np.argsort(-max_activation[in_band], kind="stable")][:n_candidates].tolist()
    examples = top_activating_examples(csr, candidates, k=k, context_window=0) if candidates else {}
    found = []
    for feature in candidates:
        words = word_tokens([int(ex.context_token_ids[ex.focus]) for ex in examples[feature]], decode)
        if len(set(words)) >= min_distinct_tokens and 2 * len(words) >= len(examples[feature]):
            found.append(describe_latent(csr, density, feature, examples[feature], matrix))
            if len(found) == count:
                break
    if not found:
        raise ValueError(f"no latent with density in {band} fires on {min_distinct_tokens}+ distinct tokens among its "
                         f"top {k} examples ({len(in_band)} in the band); widen STEERING['density_band'], lower "
                         "STEERING['min_distinct_tokens'] or set STEERING['feature']")
    return found


def interpretable_latent(csr: LatentCSR, density: np.ndarray, band: tuple[float, float] = (1e-3, 0.05),
                         min_distinct_tokens: int = 3, k: int = 10, n_candidates: int = 64,
                         decode: Callable[[int], str] | None = None) -> LatentChoice:
    """The first of :func:`interpretable_latents`: the most strongly firing qualifying latent."""
    return interpretable_latents(csr, density, band, min_distinct_tokens, k, n_candidates, decode)[0]


def output_scores(steering: ModelSteering, hook: str, choices: Sequence[LatentChoice], prompts: Sequence[str],
                  multiple: float) -> list[float]:
    """Each latent's output score: the rise in the next-token probability of its own top tokens, averaged
    over every position of ``prompts``, when its decoder direction is added at ``multiple`` times its mean
    activation. One forward per latent, on the prompts in one right-padded batch; no generation."""
    if steering.registry.handles:
        raise RuntimeError("steers are active, so every latent's score would include them; close their contexts "
                           "or call clear_steering() first")
    model = steering.model
    tokens, mask = padded([model.to_tokens(p)[0] for p in prompts], model.tokenizer.pad_token_id or 0)
    tokens, mask = tokens.to(model.cfg.device), mask.to(model.cfg.device)
    real = mask.bool()
    with torch.no_grad():
        plain = model(tokens, attention_mask=mask)[real].double().softmax(-1)  # (positions, vocab)
        scores = []
        for choice in choices:
            ids = torch.tensor(sorted(set(choice.top_token_ids)), dtype=torch.long, device=plain.device)
            with steering.steer(hook, choice.feature, multiple * choice.mean_activation):
                steered = model(tokens, attention_mask=mask)[real].double().softmax(-1)
            scores.append(float((steered[:, ids].sum(-1) - plain[:, ids].sum(-1)).mean()))
    return scores


def screen_latents(steering: ModelSteering, hook: str, choices: Sequence[LatentChoice], prompts: Sequence[str],
                   multiple: float) -> list[LatentChoice]:
    """``choices`` with their :func:`output_scores`, highest first (ties keep the given order).

    A latent can fire on a concept without its decoder direction making the model write about it (an
    *input* latent, e.g. one reading a token's spelling, against an *output* one; Arad, Mueller and
    Belinkov 2025 find that steering works with the latter). Measured on the demo's SAE, the latents
    the dose-response sweep chose first by firing strength moved their own tokens' probability by
    ~0.0004 at 4x, while the screen's best ("ask", " asking", " asked") moved it by 0.03.
    """
    scored = [c._replace(output_score=s) for c, s in zip(choices, output_scores(steering, hook, choices, prompts,
                                                                              multiple), strict=True)]
    return sorted(scored, key=lambda c: -c.output_score)


__all__ = ["DoseRecord", "DoseResponse", "LatentChoice", "choose_coefficient", "coherent", "describe_latent",
           "distinct_fraction", "dose_response", "interpretable_latent", "interpretable_latents", "output_scores", "score_generation", "screen_latents"]
