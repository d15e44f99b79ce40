"""pytest setup shared by the test files: reproducible hypothesis runs in CI."""
import os

from hypothesis import settings

# CI (CI=true) replays the same examples every run, so a submission cannot fail on an unlucky draw
# that the author never saw; local runs keep drawing new examples, which is how new bugs are found.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
