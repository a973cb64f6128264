"""What an engine step costs on this machine, learnt from the steps it runs.

    seconds = fixed + per_row * rows + per_token * tokens

rows: sequences whose logits the step computes (a decode, or a prompt's last chunk); tokens: the
query tokens it computes (1 per decode, the chunk's length per prompt); per_decode = per_row +
per_token. The fit is least squares over the steps seen, each weighted by DECAY ** (steps since),
so it follows the machine when it speeds up or slows down, with a small ridge so the system stays
solvable when every step seen was decodes alone (rows == tokens: per_row and per_token then split
a decode's cost, which is all the question below needs).

The scheduler asks it one question: does computing the waiting prompts alone, before the running
decodes, lower the summed latency? Take W prompts that would finish in the step and R sequences
waiting to decode. A mixed step computes both: everyone's token comes at M. A prompt-only step
gives the W prompts their first tokens after M - R * per_decode, and the decodes theirs after
M + fixed (the same work, one step more). So W * R * per_decode saved against R * fixed lost:
prompts first pays when W * per_decode > fixed. The answer is yes only when the fit's standard
error leaves no doubt: a shared CPU makes step times noisy, and a wrong yes costs the decodes a
whole step. With the tiny model a decode costs much per sequence (its 262k-entry LM head), so a
burst of prompts goes first; with the real model on a CPU every step first reads 1.1 GB of
weights (fixed ~85 ms, per decode ~7 ms, sim/profiles/cpu-local.yaml), so it takes a dozen
waiting prompts.
"""

import numpy as np

DECAY = 0.98  # weight of a step after 1 more: ~50 steps of memory
MIN_STEPS = 8  # weighted steps before an answer
RIDGE = 1e-6  # relative: keeps the 3 x 3 system solvable while rows == tokens in every step seen
CONFIDENCE = 2.0  # standard errors the estimated saving must clear (~98% one-sided)


class StepCostModel:
    """The fit, fed by LLMEngine.step (observe) and asked by the Scheduler (prompts_first_pays)."""

    def __init__(self, decay: float = DECAY) -> None:
        self.decay = decay
        self._xx = [[0.0] * 3 for _ in range(3)]  # decayed sums of x x^T, x = (1, rows, tokens)
        self._xy = [0.0] * 3  # decayed sums of x * seconds
        self._yy = 0.0  # decayed sum of seconds^2 (for the residual variance)
        self._fit: tuple[np.ndarray, np.ndarray] | None = None  # coefficients, their covariance

    @property
    def weight(self) -> float:
        """The decayed count of steps observed."""
        return self._xx[0][0]

    def observe(self, rows: int, tokens: int, seconds: float) -> None:
        """One step's cost (every engine step: plain floats, no arrays, ~1 us)."""
        x, d = (1.0, float(rows), float(tokens)), self.decay
        for i in range(3):
            row = self._xx[i]
            for j in range(3):
                row[j] = row[j] * d + x[i] * x[j]
            self._xy[i] = self._xy[i] * d + x[i] * seconds
        self._yy = self._yy * d + seconds * seconds
        self._fit = None

    def coefficients(self) -> tuple[float, float, float] | None:
        """(fixed, per_row, per_token) in seconds, each at least 0; None until MIN_STEPS steps, or
        while the steps seen cannot tell the fixed cost from the per-sequence cost (all one size)."""
        fit = self._solution()
        return None if fit is None else tuple(max(0.0, float(c)) for c in fit[0])

    def prompts_first_pays(self, prompts: int) -> bool:
        """Whether `prompts` prompts computed alone, ahead of the sequences waiting to decode,
        save more latency than the decodes lose (see the module docstring), by CONFIDENCE standard
        errors of the fit: noisy timings (a shared CPU) or too few batch sizes seen leave the
        answer no, and the step the usual mixed one; no as well until the fit has an answer."""
        fit = self._solution()
        if fit is None:
            return False
        theta, covariance = fit
        c = np.array((-1.0, prompts, prompts))  # saving per decode: prompts * per_decode - fixed
        saving = float(c @ theta)
        return saving > 0 and saving * saving > CONFIDENCE * CONFIDENCE * max(0.0, float(c @ covariance @ c))

    def _solution(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The least-squares coefficients and their covariance (residual variance per step times
        the inverse of the ridged normal matrix); None while there is no answer (see coefficients)."""
        if self._fit is None and self.weight >= MIN_STEPS and self._rows_vary():
            a = np.array(self._xx)
            a[np.diag_indices(3)] *= 1.0 + RIDGE
            try:
                inverse = np.linalg.inv(a)
            except np.linalg.LinAlgError:
                return None
            theta = inverse @ self._xy
            residual = max(0.0, self._yy - float(theta @ self._xy))
            self._fit = (theta, residual / (self.weight - 3) * inverse)
        return self._fit

    def _rows_vary(self) -> bool:
        """Whether the batch sizes seen spread enough (weighted variance of rows >= 1/4) to
        separate the fixed cost from the per-row cost."""
        n, s, ss = self._xx[0][0], self._xx[0][1], self._xx[1][1]
        return ss / n - (s / n) ** 2 >= 0.25
