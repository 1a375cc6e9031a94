"""Test tiers: tests/unit (pure logic), tests/component (real local servers: docker-registry,
skopeo, containerd), tests/e2e (the real local cluster). Fixtures live in tests/fixtures/."""

pytest_plugins = ["tests.fixtures.registries", "tests.fixtures.cluster"]
