import pytest
from servers import RemoteServer, write_tiny_artefacts


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory):
    return write_tiny_artefacts(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def server(artefacts):
    srv = RemoteServer("--model", str(artefacts["model"]), "--bank", str(artefacts["bank"]),
                       "--served-model-name", "tiny", "--max-batch-size", "8")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def lora_server(artefacts):
    srv = RemoteServer("--model", str(artefacts["model"]), "--lora", str(artefacts["lora"]),
                       "--served-model-name", "tiny")
    yield srv
    srv.stop()
