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
