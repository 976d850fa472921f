"""The method in one page of Markdown with LaTeX, one paragraph per teaching plot."""
from __future__ import annotations


def how_it_works_markdown(rank: int | None = None) -> str:
    """The method in one page of Markdown (LaTeX between $$ ... $$ and $ ... $), one paragraph per plot."""
    r = str(rank) if rank else "r"
    rtxt = f"r = {rank}" if rank else "r"
    return rf"""
## How it works

**4-bit weights (plot: *Inside a layer: weights and the quantization grid*).** bitsandbytes cuts each weight
matrix into blocks of 64 consecutive weights. A block stores one scale, its largest magnitude (*absmax*), and for
each weight a 4-bit index into a fixed table of 16 values $c_1, \dots, c_{{16}}$ in $[-1, 1]$ (NF4: the quantiles
of a normal distribution; FP4: a tiny floating-point format). The weight becomes
$$Q_{{ij}} = c_{{k(ij)}} \cdot \mathrm{{absmax}}_{{\text{{block}}}},$$
the nearest of the 16 levels. The plot overlays those 16 levels of one block on the histogram of the layer's
weights: a single large weight stretches the absmax, spreading the levels and leaving the many small weights
with a coarse grid. *Double quantization* stores the absmax themselves in 8 bits (one float32 per 256 blocks).

**The error (plot: *Quantization error E = W − Q and what each correction removes*).** The 4-bit layer computes
$Qx$ instead of $Wx$; the error matrix is $E = W - Q$. LoRA adds a low-rank term: peft computes
$$y = Qx + s\,BAx, \qquad A \in \mathbb{{R}}^{{r \times n}},\ B \in \mathbb{{R}}^{{m \times r}},\ s = \alpha / r.$$
Plain QLoRA starts with $B = 0$, so the whole error is still there. A quantization-aware initialization picks
$A, B$ so that $C = sBA$ cancels part of $E$ before training starts. The histogram shows $E$ and $E - C$ for each
method; the legend gives how much of it is left.

**What to cancel: the calibrated objective (plot: *Singular values of E and E·H½*).** Not every part of $E$ matters
equally: only $E x$ reaches the next layer. With $X$ the layer's inputs in the full-precision model on
calibration text and $H = XX^\top/N$,
$$\min_{{\operatorname{{rank}}(C) \le r}} \; \mathrm{{tr}}\big((E - C)\,H\,(E - C)^\top\big) = \big\|(E - C)\,H^{{1/2}}\big\|_F^2 .$$
The figures report the *calibrated error* $\sqrt{{\mathrm{{tr}}((E-C)H(E-C)^\top) / \mathrm{{tr}}(EHE^\top)}}$
(1 = plain QLoRA). The uncalibrated choice, the truncated SVD of $E$, spends its {rtxt} directions on the largest
singular values of $E$; the calibrated one on those of $EH^{{1/2}}$. Their spectra differ: $EH^{{1/2}}$ is much
more concentrated, so a few directions capture most of what the model actually feels.

**Where the rank-{r} budget goes (plot: *Share of the error a rank-k correction removes*).** Write
$E = \sum_i \sigma_i u_i v_i^\top$. The SVD correction of rank $k$ removes $\sum_{{i \le k}} \sigma_i^2\, v_i^\top H v_i$
of $\mathrm{{tr}}(EHE^\top)$, while the best calibrated correction removes $\sum_{{i \le k}} \tilde\sigma_i^2$, with
$\tilde\sigma_i$ the singular values of $EH^{{1/2}}$. The gap between the two curves is what calibration buys.

**Closed form.** With $S = (H + \lambda I)^{{1/2}}$ ($\lambda$ a small damping that keeps $S$ invertible), $CS$
ranges over all rank-$r$ matrices, so the optimum is the truncated SVD of $ES$ mapped back:
$$C^\star = \big[\mathrm{{SVD}}_r(E S)\big]\, S^{{-1}}.$$

**QuAILoRA's alternating least squares.** The paper solves the same problem iteratively with $C = PR^\top$,
starting from the SVD of $E$ and alternating 20 times
$$P \leftarrow E H R\,(R^\top H R)^{{-1}}, \qquad R^\top \leftarrow (P^\top P)^{{-1}} P^\top E,$$
each step the exact least-squares optimum of one factor with the other fixed, so the objective never increases; it
converges to the closed form. Finally $C = U\Sigma V^\top$ is split as $B = U\Sigma^{{1/2}}/\sqrt s$,
$A = \Sigma^{{1/2}}V^\top/\sqrt s$, so that $sBA = C$ exactly.

**Error feedback (method *sequential*).** Every method above fits a layer to its inputs $X$ in the full-precision
model. In the 4-bit model the layer sees other inputs, $\tilde X$: those left by the 4-bit layers before it and their
corrections. Error feedback (as GPTQ, AutoRound and ApiQ do for quantization) fits what the layer should produce
there, the full-precision model's value:
$$\min_{{\operatorname{{rank}}(C) \le r}} \; \tfrac{{1}}{{N}}\big\|WX + R - (Q + C)\tilde X\big\|_F^2 + \lambda\,\|E - C\|_F^2 ,$$
with $R = 0$ for q/k/v and gate/up, and for o_proj and down_proj, which add their output to the residual stream
$h$, the error that stream carries there, $R = h - \tilde h$: they aim at the full-precision stream after the add,
not only at their own output. With $\tilde H = \tilde X\tilde X^\top/N$, $D = (X - \tilde X)\tilde X^\top/N$,
$G = R\tilde X^\top/N$ and $S = \tilde H + \lambda I$, the unconstrained least-squares fit is
$C^\ast = E + (W D + G)\, S^{{-1}}$, and the objective equals $\mathrm{{tr}}\big((C^\ast - C)\,S\,(C^\ast - C)^\top\big)$
plus a constant: the same problem as the closed form's, with $E \to C^\ast$ and $H \to \tilde H$, so
$C = \big[\mathrm{{SVD}}_r(C^\ast S^{{1/2}})\big]S^{{-1/2}}$. With no error upstream ($\tilde X = X$, $\tilde h = h$:
block 0's q/k/v read the same embeddings in both models) it is the closed form. Two streams pass the model block by
block (full precision, and the 4-bit model with the corrections computed so far), one input group at a time in
forward order, so o_proj is fitted after q/k/v's corrections and down_proj after gate/up's. Without $R$ the layers
match their own outputs better yet the model does not improve: the error carried by the residual stream is what
reaches the logits. The report's calibrated error for this method is measured in the streams: the distance of
what the layer aims at to the full-precision model's, in the corrected 4-bit model, relative to the plain 4-bit
model's.

**Ranks under a budget (method *budgeted ranks*; figure: *Ranks per layer*).** Uniform rank gives
every layer the same {r} directions, yet the layers' spectra differ: a few directions capture most of $EH^{{1/2}}$ in
some layers, many are needed in others. With $H + \lambda I = LL^\top$, the best rank-$k$ correction of layer $l$
leaves $\sum_{{i>k}} \sigma_{{l,i}}^2$, the tail of the squared singular values of $E_l L_l$, and costs $k(m_l + n_l)$
LoRA parameters. The *budget* method gives each layer its own rank $k_l \le 4r$:
$$\max_{{k_1,\dots,k_L}} \sum_l g_l(k_l) \quad \text{{s.t.}} \quad \sum_l k_l\,(m_l + n_l) \le {r} \sum_l (m_l + n_l),$$
with $g_l(k)$ the share of the layer's own $\mathrm{{tr}}(E_l H_l E_l^\top)$ that a rank-$k$ closed form removes
(the share, not the absolute amount: activations grow with depth, and absolute units sent the rank to the last blocks
and served the model worse); the right side is exactly the LoRA parameter count of uniform rank {r}. Giving rank by largest gain per parameter is near-optimal, but not exact
when layers cost different amounts per rank (a leftover that the best step does not fit); a dynamic program over the
layers, in units $c_l$ of the gcd of the $m_l + n_l$,
$$V_l(b) = \max_{{k}}\ V_{{l-1}}(b - k\,c_l) + g_l(k),$$
is exact. The closed forms are nested (rank $k$ is the leading $k$ directions of any larger-rank one), so one
correction at rank $4r$ per layer gives every $g_l(k)$. peft stores the ranks as `rank_pattern` and $\alpha_l = s\,k_l$
as `alpha_pattern`, which keeps each layer's scaling $s$.

**A short model-level refinement (method *distill*).** The methods above fit each layer on its own; what the adapter
serves is the whole model. With $p_t$ the full-precision model's next-token distribution at position $t$ of the
calibration text and $q_t$ that of the 4-bit model with its LoRA, *distill* starts from the closed form and takes a
few AdamW steps on the factors $A, B$ only ($Q$ stays frozen) to lower
$$\mathcal{{L}} = \frac{{1}}{{T}} \sum_t \mathrm{{KL}}(p_t \,\|\, q_t) = \frac{{1}}{{T}} \sum_t \sum_v p_t(v)\,\big(\log p_t(v) - \log q_t(v)\big).$$
Its gradient with respect to the 4-bit model's logits is $(q_t - p_t)/T$: the target is the full model's whole
distribution, not only the next token of the text, and errors of all layers are corrected together, through the
nonlinearities between them. The full-precision logits need no second model in memory: the calibration windows pass
the full-precision blocks one at a time (as calibration does), and their last hidden states go through the model's
own final norm and lm_head, which QLoRA does not quantize. A few windows are held out of the steps: the KL before and
after on them (in the report) says whether the steps fitted the model or only the windows they saw. No per-layer
errors are shown for this method: it optimizes none of them.

**What the three teach, measured (`python -m bench.beyond`, embedded model, 64 x 256 calibration tokens).** Share
of the 4-bit -> 8-bit perplexity gap closed at initialization, rank 8 / 16 / 64: closed form 72% / 77% / 90%;
*distill* 93% / 97% / 115% (at rank 64 below the full-precision model itself: with that many parameters the steps
adapt the model to the text, beyond undoing quantization); *sequential* 78% / 85% / 94%; *budget* 74% / 78% / 91%.
Calibrated on the reviews and measured on the speeches (rank 16): distill 86% against the closed form's 72%, so most
of its gain is not the calibration windows; the other way round, 80% against 66%. Error feedback gains in-text but
loses a little across texts (72% and 62% against 72% and 66%): fitting what the corrected model's own inputs need
follows the calibration text more closely. Budgeted ranks move about two points: the spectra differ between layers
(see *Ranks per layer*) but uniform rank is already close to the best split of the same parameters. The lesson: what
is left after the layer-wise optimum is mostly error that only shows at the model's output, through the layers
together.

**Outlier channels (plot: *Input channels that dominate H*).** $H_{{jj}}$ is the mean squared activation of input
channel $j$. In transformers a handful of channels often carry activations far larger than the rest; an error in the
weight column of such a channel is amplified in every output. The calibrated methods concentrate their correction
on those columns; the right panel shows the share of each column's error left.

**Rank sweep (plot: *Calibrated error against LoRA rank*).** The same corrections at ranks 1 to 64, averaged over
the chosen layers: the closed form is optimal at every rank, QuAILoRA follows it, and the SVD of $E$ lags far
behind because it optimizes the weights, not the outputs. Held-out perplexity, when computed, shows how much of
the layer-level gain reaches the model.

**Precision trade-off (plot: *Memory of the weights against held-out perplexity*).** Bytes of the weights per
format, measured on bitsandbytes' own tensors: 4-bit codes (0.5 byte per weight) plus one absmax per block of 64
(float32: +0.5 bit per weight; with double quantization 8-bit: +0.127 bit), against the perplexity measured by init
runs. A QuAILoRA adapter costs $4\,r(m+n)$ bytes per layer and moves the 4-bit point toward the 8-bit one.
""".strip()
