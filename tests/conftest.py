"""Shared pytest configuration. Fixture modules live in tests/support/ and are registered here."""

pytest_plugins: list[str] = [
    # one line per fixture module, e.g. "tests.support.kube_emulator"
    "tests.support.hfhub",
    "tests.support.s3",
    "tests.support.s3files",
    "tests.support.gcs",
    "tests.support.azurite",
    "tests.support.httpfiles",
    "tests.support.kubeapi",
    "tests.support.agents",
]
