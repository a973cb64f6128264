"""Request ids: random hex, cheap enough for the per-request path.

uuid.uuid4() reads the kernel's random source on every call (a system call) and builds a UUID
object: ~7 µs per id in the loaded router, twice per request. These ids need to be unique, not
unpredictable (they name requests, they guard nothing), so they come from a generator of this
module's own, seeded once from the kernel's random source; no one else's seed() reaches it.
"""

import random

_random = random.Random()  # seeded from os.urandom


def random_hex(digits: int = 32) -> str:
    """`digits` random hex digits (32: as many random bits as a UUID4's hex, plus 6)."""
    return f"{_random.getrandbits(4 * digits):0{digits}x}"
