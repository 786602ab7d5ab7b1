"""CUDA-awareness detection against stand-in MPI libraries compiled here, one for each outcome.

Each stand-in is a shared library exporting the query of one MPI (or none),
built with the C compiler at test time and loaded through ctypes as the
real library is: MPICH's ``MPIX_GPU_query_support`` answering 1 or 0 (as
``MPIR_CVAR_ENABLE_GPU=0`` makes it), Open MPI's ``MPIX_Query_cuda_support``,
and a library with neither.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from mpitrain.comm import cuda_aware

SOURCES = {
    "mpich_aware": "int MPIX_GPU_query_support(int kind, int *out) { *out = kind == 0; return 0; }",
    "mpich_gpu_off": "int MPIX_GPU_query_support(int kind, int *out) { *out = 0; return 0; }",
    "mpich_both_off": "int MPIX_GPU_query_support(int kind, int *out) { *out = 0; return 0; }\n"
    "int MPIX_Query_cuda_support(void) { return 1; }",
    "openmpi_aware": "int MPIX_Query_cuda_support(void) { return 1; }",
    "openmpi_not": "int MPIX_Query_cuda_support(void) { return 0; }",
    "no_query": "int MPI_Init(int *argc, char ***argv) { return 0; }",
}


@pytest.fixture(scope="module")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Build each stand-in as libmpi_<name>.so; their paths by name."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the stand-in MPI libraries")
    folder = tmp_path_factory.mktemp("fake-mpi")
    paths = {}
    for name, source in SOURCES.items():
        c_file, library = folder / f"{name}.c", folder / f"libmpi_{name}.so"
        c_file.write_text(source + "\n")
        subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(c_file)], check=True)
        paths[name] = str(library)
    return paths


@pytest.mark.parametrize(
    ("name", "aware", "function"),
    [
        ("mpich_aware", True, "MPIX_GPU_query_support"),
        ("mpich_gpu_off", False, "MPIX_GPU_query_support"),
        ("mpich_both_off", False, "MPIX_GPU_query_support"),  # MPICH's run-time answer wins over its old query
        ("openmpi_aware", True, "MPIX_Query_cuda_support"),
        ("openmpi_not", False, "MPIX_Query_cuda_support"),
    ],
)
def test_the_librarys_own_query_decides(libraries, name, aware, function):
    found = cuda_aware.detect(environ={}, libraries=[libraries[name]])
    assert (found.aware, found.source) == (aware, "query")
    assert function in found.detail and f"libmpi_{name}.so" in found.detail


def test_a_library_without_a_query_is_not_aware(libraries):
    found = cuda_aware.detect(environ={}, libraries=[libraries["no_query"]])
    assert (found.aware, found.source) == (False, "none")
    assert "MPITRAIN_CUDA_AWARE=1" in found.detail


def test_the_first_library_that_answers_decides(libraries):
    found = cuda_aware.detect(environ={}, libraries=[libraries["no_query"], libraries["openmpi_aware"]])
    assert found.aware and "openmpi_aware" in found.detail


@pytest.mark.parametrize(("value", "aware"), [("1", True), ("0", False), (" 1 ", True)])
def test_the_environment_overrides_the_query(libraries, value, aware):
    opposite = libraries["mpich_gpu_off" if aware else "mpich_aware"]
    found = cuda_aware.detect(environ={"MPITRAIN_CUDA_AWARE": value}, libraries=[opposite])
    assert (found.aware, found.source) == (aware, "environment")


def test_a_bad_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="MPITRAIN_CUDA_AWARE='yes': expected 0 or 1"):
        cuda_aware.detect(environ={"MPITRAIN_CUDA_AWARE": "yes"}, libraries=[])


def test_no_library_at_all_is_not_aware():
    found = cuda_aware.detect(environ={}, libraries=[])
    assert not found.aware and found.source == "none"


def test_this_process_finds_its_own_mpi_library():
    from mpi4py import MPI

    loaded = cuda_aware.loaded_libraries()
    assert loaded, "the MPI library mpi4py loaded is not among the mapped ones"
    found = cuda_aware.detect(environ={})
    if "MPICH" in MPI.Get_library_version() or "Open MPI" in MPI.Get_library_version():
        assert found.source == "query", found.detail  # both have a query: it must have been reached
