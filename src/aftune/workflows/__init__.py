"""One library entry point per workflow: the client states once what it expects, then verifies.

    python -c "import aftune; help(aftune.RunVerifier)"

- `training.py`: `RunVerifier` (verify, check, challenge, audit, calibrate, prepare, attest) and
  the provider's `open_challenge`;
- `inference.py`: `InferenceRequest`, `RecordVerifier` (verify, audit) and `verify_receipt`;
- `check.py`: static checks of records, partition records and TEE evidence;
- `setup.py`: keys, model digests, generation policies, challenge plans;
- `expect.py`: how inputs are given (keys as paths, `ed25519:<hex>` or objects; ids as hex) and
  the `Unsafe...` objects, the only way to weaken a check;
- `quiet.py`: library calls print nothing.

Every rule a client relies on lives in this package or below it; `aftune.api` and the CLI only
translate arguments and present results. A FAIL is a `Report` with verdict FAIL, never an
exception; bad input raises an `AftuneError` subclass.
"""

from .check import check, check_partition, verify_attestation
from .expect import Unsafe, UnsafeNoAgreement, UnsafeSignatureOnly, UnsafeSkipInputCheck, UnsafeSkipPolicyCheck
from .inference import InferenceRequest, RecordVerifier, verify_receipt
from .setup import assess, digest, keygen, plan, policy
from .training import ALL, RunVerifier, open_challenge

__all__ = ["ALL", "InferenceRequest", "RecordVerifier", "RunVerifier", "Unsafe", "UnsafeNoAgreement",
           "UnsafeSignatureOnly", "UnsafeSkipInputCheck", "UnsafeSkipPolicyCheck", "assess", "check",
           "check_partition", "digest", "keygen", "open_challenge", "plan", "policy", "verify_attestation",
           "verify_receipt"]
