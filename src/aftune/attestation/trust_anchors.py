"""The roots aftune pins: Intel SGX Root CA (SGX and TDX DCAP quotes) and NVIDIA Device Identity
CA (Hopper GPU attestation reports).

    python -c "from aftune.attestation.trust_anchors import intel_root_der; print(len(intel_root_der()))"

Both are public certificates. Each is pinned twice: by its PEM below and by the SHA-256
fingerprint of its DER, checked whenever it is loaded, so an edit to one without the other is an
error, never a silently different trust anchor. Sources: Intel's certificate is the root of every
PCK and TCB-signing chain Intel publishes (https://certificates.trustedservices.intel.com/
IntelSGXRootCA.der), identical to the one dcap-qvl embeds; NVIDIA's is
`verifier_device_root.pem` of NVIDIA's nvtrust local GPU verifier (Apache-2.0). There is no
pinned root for Arm CCA: a CCA platform key (CPAK) is endorsed per device by its vendor, so the
client passes the platform keys it trusts (`Endorsements.cca_platform_keys`).
"""

from __future__ import annotations

from functools import lru_cache

INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
INTEL_SGX_ROOT_CA_PEM = b"""-----BEGIN CERTIFICATE-----
MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIw
aDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENv
cnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJ
BgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgG
A1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0
aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYT
AlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi7
1OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOB
uzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJ
MEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50
ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SV
Ur9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYI
KoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwg
AiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=
-----END CERTIFICATE-----
"""

NVIDIA_DEVICE_ROOT_CA_SHA256 = "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48"
NVIDIA_DEVICE_ROOT_CA_PEM = b"""-----BEGIN CERTIFICATE-----
MIICCzCCAZCgAwIBAgIQLTZwscoQBBHB/sDoKgZbVDAKBggqhkjOPQQDAzA1MSIw
IAYDVQQDDBlOVklESUEgRGV2aWNlIElkZW50aXR5IENBMQ8wDQYDVQQKDAZOVklE
SUEwIBcNMjExMTA1MDAwMDAwWhgPOTk5OTEyMzEyMzU5NTlaMDUxIjAgBgNVBAMM
GU5WSURJQSBEZXZpY2UgSWRlbnRpdHkgQ0ExDzANBgNVBAoMBk5WSURJQTB2MBAG
ByqGSM49AgEGBSuBBAAiA2IABA5MFKM7+KViZljbQSlgfky/RRnEQScW9NDZF8SX
gAW96r6u/Ve8ZggtcYpPi2BS4VFu6KfEIrhN6FcHG7WP05W+oM+hxj7nyA1r1jkB
2Ry70YfThX3Ba1zOryOP+MJ9vaNjMGEwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8B
Af8EBAMCAQYwHQYDVR0OBBYEFFeF/4PyY8xlfWi3Olv0jUrL+0lfMB8GA1UdIwQY
MBaAFFeF/4PyY8xlfWi3Olv0jUrL+0lfMAoGCCqGSM49BAMDA2kAMGYCMQCPeFM3
TASsKQVaT+8S0sO9u97PVGCpE9d/I42IT7k3UUOLSR/qvJynVOD1vQKVXf0CMQC+
EY55WYoDBvs2wPAH1Gw4LbcwUN8QCff8bFmV4ZxjCRr4WXTLFHBKjbfneGSBWwA=
-----END CERTIFICATE-----
"""


def _pinned_der(pem: bytes, sha256_hex: str, name: str) -> bytes:
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    if hashlib.sha256(der).hexdigest() != sha256_hex:  # pragma: no cover - only an edit of this file
        raise RuntimeError(f"the pinned {name} does not match its pinned fingerprint {sha256_hex}")
    return der


@lru_cache(maxsize=None)
def intel_root_der() -> bytes:
    return _pinned_der(INTEL_SGX_ROOT_CA_PEM, INTEL_SGX_ROOT_CA_SHA256, "Intel SGX Root CA")


@lru_cache(maxsize=None)
def nvidia_root_der() -> bytes:
    return _pinned_der(NVIDIA_DEVICE_ROOT_CA_PEM, NVIDIA_DEVICE_ROOT_CA_SHA256, "NVIDIA Device Identity CA")


def describe_root(der: bytes) -> str:
    """`'CN=Intel SGX Root CA,…' (sha256 44a0196b2b99f889…)`: how messages name a root."""
    import hashlib

    from cryptography import x509

    try:
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        subject = "an unparsable certificate"
    return f"'{subject[:100]}' (sha256 {hashlib.sha256(der).hexdigest()[:16]}…)"
