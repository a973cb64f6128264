"""Deciders: does remote prefill pay for this request on the chosen decode worker?

- conditional: remote prefill iff the tokens the decode worker would have to compute itself
  (prompt tokens minus those cached on it) are at least min_uncached_tokens. Short prompts and
  prompts mostly cached on the decode worker prefill locally, skipping the KV transfer.
- always_remote: full disaggregation. never_remote: no disaggregation.
"""

from services.router.placement.base import Decision
from services.router.placement.registry import register


@register("decider", "conditional")
class ConditionalDecider:
    name = "conditional"
    uses_prefix_index = True

    def __init__(self, min_uncached_tokens: int = 128):
        if min_uncached_tokens < 0:
            raise ValueError("conditional: min_uncached_tokens must be >= 0")
        self.min_uncached_tokens = min_uncached_tokens

    def decide(self, request, decode):
        uncached = request.num_prompt_tokens - request.cached_tokens(decode)
        if uncached >= self.min_uncached_tokens:
            return Decision(True, f"uncached {uncached} >= {self.min_uncached_tokens} tokens")
        return Decision(False, f"uncached {uncached} < {self.min_uncached_tokens} tokens")


@register("decider", "always_remote")
class AlwaysRemote:
    name = "always_remote"

    def decide(self, request, decode):
        return Decision(True, "always_remote")


@register("decider", "never_remote")
class NeverRemote:
    name = "never_remote"

    def decide(self, request, decode):
        return Decision(False, "never_remote")
