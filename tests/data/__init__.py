"""Tests of jaxllm.data."""


def shared_data_dir(tmp_path_factory):
    """One data dir for the whole test session, so the corpus is extracted once."""
    path = tmp_path_factory.getbasetemp() / "jaxllm_data"
    path.mkdir(exist_ok=True)
    return path
