"""The sequential neuron-level editor (``nse``), in the NSE / AlphaEdit spirit.

Same pipeline as MEMIT (:mod:`editing.editors.memit`) with sequential choices, each a flag:

- ``accumulate`` (default on): every batch's keys are added to ``C_edits`` per layer and
  the solve is ``ΔW = Rᵀ K (λ C0 + C_edits + KᵀK)⁻¹``, so later batches hold earlier
  edits' keys in place instead of overwriting them;
- ``rewind`` (default off: measured worse on the tiny models, see bench/RESULTS.md): values ``z`` are optimised on the ORIGINAL weights of the
  edited layers (kept in the state as ``<weight>::W0``), NSE's weight rewinding; the
  residual is then taken against the current (already edited) model;
- ``nullspace``: AlphaEdit's projection of the update onto the null space of ``C0``
  (projector ``<weight>::P`` computed once and kept in the state);
- ``neuron_share``: only the neurons (columns of ``W_out``) holding this share of
  ``Σ|k|`` over the batch are updated (NSE's neuron selection);
- ``siblings`` (default 8; 0 = off): per request, that many entities of the subject's kind
  named by the model (:mod:`editing.editors.siblings`) whose keys in the request's prompt
  are held in place (``+ w K_sᵀK_s`` in the regulariser, accumulated into ``C_edits``);
  on SmolLM2, 100 country edits in batches of 10, it raised neighbourhood from 0.83 to
  0.92 × base (neighbours' greedy answers kept: 0.16 → 0.44) at a cost in paraphrase
  probability (0.83 → 0.78; top-1 paraphrase 0.45 → 0.48), bench/RESULTS.md 2026-12-01;
  ``sibling_contexts`` averages the sibling keys over the edit keys' context templates
  (default: the bare prompt); ``sibling_weight`` default 0.25 (was 1): where the held keys crowd the
  key space (the fact world, 1,000 edits b10) efficacy 0.74 → 0.80, paraphrase 0.51 → 0.54,
  neighbourhood 0.83 → 0.81 × base, perplexity +46 % → +39 %; on SmolLM2 (217 edits b10) the same
  within noise (0.94 / 0.70 / 0.84 × / +10.1 % → 0.94 / 0.69 / 0.85 × / +7.7 %), bench/RESULTS.md session 10;
- ``subject_key_weight`` (default 3; 0 = off): per request a second key, the subject alone after
  the context prefixes (no prompt words), fitted to the same residual with this weight
  (``ΔW = Rᵀ (K + w K_x)(λ C0 + C_edits + KᵀK + w K_xᵀK_x)⁻¹``, still rank ≤ batch size, moment
  accumulated), so the edit follows the subject into other wordings; with the value loss
  stopping at NLL 0.01 instead of 0.05 (``value.loss_stop``) it raised paraphrase on 20
  "official language" edits in batches of 10 from 0.80 to 0.85 (bench/RESULTS.md, 2026-12-01 session 6);
- ``subject_start`` (default on): the subject-alone keys also include the subject as the text's first
  word. Byte-level tokenizers spell it differently there (SmolLM2: "Argentina" opening a text is
  ``Ar gent ina``, `` Argentina`` elsewhere), so wordings that open with the subject ("Argentina shares a
  border with") reached neither key. On 20 SmolLM2 "border" edits in batches of 10 (λ 3e3) paraphrase
  rose from 0.68 to 0.88 (those wordings 0.45 → 0.80 and 0.60 → 0.85), on 20 "official language" edits
  from 0.83 to 0.92, efficacy and neighbourhood unchanged (1.00, 1.00 × base), bench/RESULTS.md session 13;
- ``subject_after`` (default empty): the subject-alone keys also include the subject in these frames; with the
  generated prefixes' start words (``keys.SUBJECT_AFTER_STARTS``: "The {}", "Therefore {}", …), the text's second
  position, where wordings such as "In {}, most people speak" put it; there the edit realises 0.62 of the value on
  one SmolLM2 batch (0.83–0.92 at the subject's other places), and the model reads a value there less
  (bench/subject_position.py); on SmolLM2's 217 at b10 those frames fell behind its preset by 70 edits (paraphrase
  0.848 against 0.910, bench/RESULTS.md session 44);
- ``subject_frame`` (default ``"kept"``): ``"batch"`` applies the subject-alone keys (the edits' and
  the siblings') in their own batch's solve only, carrying just the prompt keys to later batches; on 42
  requests that edit subjects again (continent after capital/language) it was worse on every measure
  (efficacy 0.60 against 0.64, neighbourhood 0.78 against 0.89 × base), so ``"kept"`` stays;
- ``value.keep_weight`` (default 1; 0 = off): the state keeps a ledger ``subject → prompts edited``
  (``subject_prompts``); a later edit of the same subject adds a KL term per earlier prompt to its value
  optimisation, so the new value leaves the subject's earlier edits as the model now answers them.
  On those 42 requests, first batch kept 0.6 → 0.9, efficacy 0.64 → 0.81, earlier capital edits
  0.67 → 1.00 (bench/RESULTS.md, 2026-12-01 session 7); ``value.keep_contexts`` takes that KL after every
  context template too, and ``subject_key_again=false`` fits such a re-edit at its prompt key only (both off:
  neither did better on SmolLM2's 217, bench/RESULTS.md session 36); ``release_subject`` (off) takes the
  subject's earlier subject-alone hold out of ``C_edits`` first (the state's ``subject_holds``), so the
  re-edit writes its value there in full; its negative remainder is cut (bench/RESULTS.md session 37); a
  number s in (0, 1] releases that share of the hold and leaves the rest to the earlier edit;
- ``release_siblings`` (default off): a subject held as a sibling in a prompt (ledger ``held_siblings``,
  weights summed over batches) and later edited in that same prompt is first taken out of ``C_edits``
  (``C_edits −= w k kᵀ``, ``k`` its current key, the negative remainder cut), so its old answer no longer
  resists its own edit;
- ``hold_noops`` (default on): a request the model already answers is not edited, and its keys are held as a
  sibling's so the batch's other edits leave its answer (not a key the batch edits; bench/RESULTS.md "No-ops in
  a batch": 30 of 30 kept against 28 on the fact world, edits as many);
- ``repasses``: requests whose residual ``‖z − h‖/‖z − h₀‖`` is still above
  ``residual_tol`` (``repass_on="residual"``), or whose target is not yet the top prediction
  (``"not_taken"``), are edited again (≤ 2 passes in NSE); the passes are merged and
  compacted to rank ≤ batch size. Repass ``p`` solves with ``λ · repass_lam_factor^p`` (default 1:
  the same λ), so a high λ can hold the requests that take easily to small updates and only the
  others get the weaker regulariser;
- ``lam_ladder`` (grid steps): the λ ladder for any model: the first solve runs ``lam_ladder`` steps of the
  calibration grid above λ (the calibrated or preset λ: 3e3 → 1e4) and repass ``p`` of ``R`` at
  ``λ_top (λ / λ_top)^(p/R)``, so the requests still not taken end at λ itself. Off by default
  (``lam_ladder=1 repasses=2 repass_on=not_taken`` is the measured setting): on SmolLM2's 217 requests it
  cuts the drift at batch sizes 10 and 100 (+7.9 % → +4.7 %, +8.1 % → +5.1 %), but at batch size 1 it costs
  neighbourhood, and on the fact world efficacy and paraphrase (bench/RESULTS.md, session 24).

A model's preset may set these options where the user gives none (``Preset.sequential``,
:meth:`MemitEditor.settings_for`): SmolLM2-135M's turns on its best measured setting, the λ ladder with
``sibling_pool=24`` and the subject's other facts kept by the value's KL (``other_prompts=8``,
``other_prompts_weight=0``, ``other_prompts_kl=0.01``; :data:`editing.editors.presets.SMOLLM2_SEQUENTIAL`, where
the figures are). Other models keep the defaults above.

State per edited layer (fixed size, whatever the number of earlier edits), plus the two ledgers in the
metadata (strings and weights; they grow with the distinct (subject, prompt) pairs, and a batch reads only
its own subjects' entries):
``C_edits`` (d_in × d_in; with ``siblings``, their keys' moment too), ``W0`` (d_out × d_in) with ``rewind``, ``P`` (d_in × d_in) with
``nullspace``. Values are cached only within a batch (between passes): a per-request
cache would grow with the number of edits, and with ``W0`` in the state any value
can be recomputed against the original model when a request is edited again.
"""
from __future__ import annotations

from typing import Any

from editing.editors.memit import MemitEditor


class SequentialEditor(MemitEditor):
    """``nse``: MEMIT plus accumulated keys, weight rewinding, optional null-space/neuron restriction, re-editing."""

    name = "nse"
    takes_sequential_preset = True
    defaults: dict[str, Any] = {"accumulate": True, "rewind": False, "nullspace": False, "neuron_share": None,
                                "repasses": 1, "siblings": 8, "sibling_weight": 0.25, "subject_key_weight": 3.0,
                                "subject_start": True, "hold_noops": True,
                                "value": {"loss_stop": 0.01, "keep_weight": 1.0}}
