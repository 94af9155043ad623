"""TEE-shielded DNN partition (TAOISM's strategies) with Slalom-style checked, blinded offloading.

    from aftune.partition import PartitionRuntime, check_record
    with PartitionRuntime() as rt:
        result = rt.run("models/llama", strategy="shield-deep", input_ids=ids, max_new_tokens=8,
                        store_crossings=True)
    check_record(result.record, public_key=rt.public_key, crossings=result.crossings)

    aftune partition strategies models/llama
    aftune partition run models/llama --strategy shield-nonlinear --prompt "Q: hi"

A trusted process (spawned: its own memory) holds the model, the signing key, the Freivalds
vectors and the blinding masks; an untrusted worker process receives only the weights the
strategy exposes, quantized, and blinded operands, and returns products mod p, each checked by
Freivalds' algorithm. Every message is counted and committed to a signed record.

On these machines the trusted side is process isolation only (no TEE: no memory encryption, no
attestation). Modules: field (Z_p arithmetic), quantize, freivalds, blinding, strategies,
teeslice, wire (frames), link (crossings), worker, dishonest, offload (proxies), execute (loops),
requests, trusted, runtime, record. docs/partition.md explains the design; SPEC.md 11 the bytes.
"""

from .blinding import MaskPool
from .dishonest import ATTACKS, Attack, TamperingWorker
from .errors import IntegrityFailure, PartitionError
from .field import DEFAULT_MODULUS, Field
from .freivalds import FreivaldsCheck, FreivaldsSpec
from .offload import Arithmetic
from .quantize import QuantSpec
from .record import TRUSTED_SIDE_LABEL, PartitionRecord, RecordCheck, check_record, load_crossings, save_crossings
from .runtime import PartitionResult, PartitionRuntime
from .strategies import STRATEGIES, Exposure, Plan, StrategyConfig, find_sites, make_plan
from .worker import Worker

__all__ = [
           "ATTACKS",
           "DEFAULT_MODULUS",
           "STRATEGIES",
           "TRUSTED_SIDE_LABEL",
           "Arithmetic",
           "Attack",
           "Exposure",
           "Field",
           "FreivaldsCheck",
           "FreivaldsSpec",
           "IntegrityFailure",
           "MaskPool",
           "PartitionError",
           "PartitionRecord",
           "PartitionResult",
           "PartitionRuntime",
           "Plan",
           "QuantSpec",
           "RecordCheck",
           "StrategyConfig",
           "TamperingWorker",
           "Worker",
           "check_record",
           "find_sites",
           "load_crossings",
           "make_plan",
           "save_crossings",
]
