"""Verify evidence: parse it into claims (signatures checked), then appraise the claims against an
explicit policy, as two separate steps; the result lists every check and names the failed one.

    from aftune.attestation import Evidence, AppraisalPolicy, verify_evidence
    a = verify_evidence(evidence, policy=AppraisalPolicy(reference_values=(("mrenclave", mr),)), now=t)
    print(a.summary()); a.require()

Step 1 (`parse_claims`) is per platform: `intel_dcap`, `arm_cca`, `nvidia_spdm`, and the
simulated kind of `providers`. It raises AttestationFailure when the evidence is not authentic.
Step 2 (`appraise`) never looks at bytes again, only at claims: simulated evidence (refused unless
`unsafe_accept_simulated`), TCB status and advisories (Intel), debug state, reference values, and
the binding of the user data field to what the caller expects. A check that compared nothing is
SKIPPED, never PASS, and the callers that need it (attested verdicts, serving) require it.
"""

from __future__ import annotations

from datetime import datetime

from .binding import user_data_field
from .claims import (FAIL, PASS, SKIPPED, Appraisal, AttestationFailure, Check, Claims, Endorsements, Evidence, AppraisalPolicy,
                     format_time, short, utc_now)


def parse_claims(evidence: Evidence, *, endorsements: Endorsements, now: datetime) -> Claims:
    """Step 1: authenticate the evidence and return what it claims (raises AttestationFailure)."""
    if evidence.kind in ("sgx", "tdx"):
        from .intel_dcap import parse_dcap

        return parse_dcap(evidence, endorsements, now)
    if evidence.kind == "cca":
        from .arm_cca import parse_cca

        return parse_cca(evidence, endorsements)
    if evidence.kind == "nvidia":
        from .nvidia_spdm import parse_nvidia

        return parse_nvidia(evidence, endorsements, now)
    from .providers import parse_simulated

    return parse_simulated(evidence)


def appraise(claims: Claims, policy: AppraisalPolicy, *, expected_user_data: bytes | None = None) -> tuple[Check, ...]:
    """Step 2: compare claims with the policy and the expected binding; every check, in order."""
    checks = [Check("signature", SKIPPED if claims.kind == "simulated" else PASS, claims.anchor)]
    if claims.kind == "simulated":
        if policy.unsafe_accept_simulated:
            checks.append(Check("simulated", PASS, "UNSAFE: simulated evidence accepted; no TEE produced it, "
                                                   "so it proves nothing about the code that ran"))
        else:
            checks.append(Check("simulated", FAIL, "simulated evidence (no TEE) is refused; accept it only for tests, "
                                                   "with --unsafe-accept-simulated"))
    if claims.tcb_status is not None:
        accepted = policy.accepted_tcb_statuses
        ok = claims.tcb_status in accepted
        checks.append(Check("tcb", PASS if ok else FAIL,
                            f"status {claims.tcb_status} is {'' if ok else 'not '}accepted by policy "
                            f"(accepted: {', '.join(accepted) or 'none'})"))
        refused = [a for a in claims.advisories if a not in policy.accepted_advisories]
        if refused:
            checks.append(Check("advisories", FAIL, f"{', '.join(refused)} not accepted by policy "
                                                    f"(accepted: {', '.join(policy.accepted_advisories) or 'none'})"))
        else:
            checks.append(Check("advisories", PASS, f"{', '.join(claims.advisories) or 'none'} (all accepted)"))
    if claims.debug:
        status = PASS if policy.unsafe_allow_debug else FAIL
        checks.append(Check("debug", status, ("UNSAFE, accepted: " if policy.unsafe_allow_debug else "") + claims.debug_reason))
    else:
        checks.append(Check("debug", PASS, "not a debug TEE"))
    checks.extend(_reference_checks(claims, policy))
    if expected_user_data is None:
        checks.append(Check("binding", SKIPPED, f"no expected {user_data_field(claims.kind)} given"))
    elif claims.user_data == expected_user_data:
        checks.append(Check("binding", PASS, f"{user_data_field(claims.kind)} carries the expected binding "
                                             f"{short(expected_user_data)}"))
    else:
        checks.append(Check("binding", FAIL, f"{user_data_field(claims.kind)} does not carry this binding "
                                             f"(expected {short(expected_user_data)}, found {short(claims.user_data)}): "
                                             "evidence made for another nonce, key or subject"))
    return tuple(checks)


def _reference_checks(claims: Claims, policy: AppraisalPolicy) -> list[Check]:
    if claims.kind == "simulated":
        return [Check("measurement", SKIPPED, "simulated evidence has no measurements")]
    if not policy.reference_values:
        return [Check("measurement", SKIPPED, "no reference values given: the code the TEE runs was not appraised")]
    out = []
    for name, expected in policy.reference_values:
        found = claims.measurement(name)
        if found is None:
            have = ", ".join(k for k, _ in claims.measurements[:12])
            out.append(Check(f"measurement {name}", FAIL, f"the evidence has no claim {name!r} (it has: {have})"))
        elif found != expected:
            out.append(Check(f"measurement {name}", FAIL, f"{name} is {short(found)}, the reference value is "
                                                          f"{short(expected)}: other code runs in the TEE"))
        else:
            out.append(Check(f"measurement {name}", PASS, f"{name} = {short(found)} as referenced"))
    return out


def verify_evidence(evidence: Evidence, *, policy: AppraisalPolicy = AppraisalPolicy(), endorsements: Endorsements = Endorsements(),
                    now: datetime | None = None, expected_user_data: bytes | None = None) -> Appraisal:
    """Verify one piece of evidence at `now` (default: the current time). Returns an Appraisal;
    evidence that is not authentic gives an Appraisal without claims whose one check failed.
    Raises InputError only for bad usage (missing collateral or platform keys, a missing extra)."""
    at = utc_now(now)
    try:
        claims = parse_claims(evidence, endorsements=endorsements, now=at)
    except AttestationFailure as exc:
        return Appraisal(evidence.kind, None, (Check(exc.check, FAIL, exc.reason),))
    checks = appraise(claims, policy, expected_user_data=expected_user_data)
    return Appraisal(evidence.kind, claims, checks + (Check("time", PASS, f"verified at {format_time(at)}"),)
                     if evidence.kind in ("sgx", "tdx", "nvidia") else checks)
