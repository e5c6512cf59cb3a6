"""The version has one source, project(syncbn VERSION ...) in CMakeLists.txt: the loaded
library reports it (syncbn_get_version), and the installed distribution's metadata carries it."""

import importlib.metadata
import os
import re

import syncbn


def test_version_is_the_one_in_cmakelists():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    with open(os.path.join(root, "CMakeLists.txt")) as f:
        declared = re.search(r"project\(syncbn VERSION ([0-9]+\.[0-9]+\.[0-9]+)", f.read()).group(1)
    assert syncbn.__version__ == declared
    try:
        installed = importlib.metadata.version("syncbn")
    except importlib.metadata.PackageNotFoundError:  # run from the tree (SYNCBN_LIBRARY)
        return
    assert installed == declared
