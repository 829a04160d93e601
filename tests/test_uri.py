from pathlib import Path

import pytest

from localmodel.errors import URIError
from localmodel.layout import CacheLayout, storage_key
from localmodel.uri import parse_uri


@pytest.mark.parametrize(
    ("uri", "fields"),
    [
        (
            "hf://meta-llama/Llama-3.1-8B",
            {"scheme": "hf", "repo_id": "meta-llama/Llama-3.1-8B", "revision": None},
        ),
        ("hf://org/m:main", {"scheme": "hf", "repo_id": "org/m", "revision": "main"}),
        ("hf://org/m:refs/pr/1", {"revision": "refs/pr/1"}),
        ("hf://org/m:" + "a" * 40, {"revision": "a" * 40}),
        (
            "s3://my-bucket/models/llama",
            {"scheme": "s3", "bucket": "my-bucket", "key": "models/llama"},
        ),
        ("s3://my-bucket", {"bucket": "my-bucket", "key": ""}),
        ("s3://my-bucket/one/file.safetensors", {"key": "one/file.safetensors"}),
        ("http://host:8080/m.tar.gz", {"scheme": "http", "url": "http://host:8080/m.tar.gz"}),
        ("https://host/m.zip?X-Amz-Signature=abc", {"scheme": "https"}),
        ("file:///mnt/nfs/model", {"scheme": "file", "path": "/mnt/nfs/model"}),
        ("file://localhost/mnt/x", {"path": "/mnt/x"}),
        ("/mnt/nfs/model", {"scheme": "file", "path": "/mnt/nfs/model"}),
        ("gs://my_bucket.v2/models/llama", {"scheme": "gs", "bucket": "my_bucket.v2", "key": "models/llama"}),
        # Azure Blob by KServe's host patterns (kserve_storage.py:68-71), ADLS Gen2 by its dfs host.
        (
            "https://acct.blob.core.windows.net/models/llama/x%20y?sv=1&sig=abc",
            {"scheme": "azure", "host": "acct.blob.core.windows.net", "bucket": "models", "key": "llama/x y"},
        ),
        ("https://acct.z12.blob.storage.azure.net/models/m", {"scheme": "azure", "key": "m"}),
        (
            "https://acct.dfs.core.windows.net/fsys/m",
            {"scheme": "azure", "host": "acct.blob.core.windows.net", "bucket": "fsys"},
        ),
        (
            "abfss://fsys@acct.dfs.core.windows.net/a/b",
            {"scheme": "azure", "host": "acct.blob.core.windows.net", "bucket": "fsys", "key": "a/b"},
        ),
        ("https://acct.blob.core.windows.net:8443/c1/m.bin", {"scheme": "https"}),  # not Azure's endpoint
    ],
)
def test_parses(uri: str, fields: dict[str, object]) -> None:
    parsed = parse_uri(uri)
    assert parsed.raw == uri
    for name, value in fields.items():
        assert getattr(parsed, name) == value


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("hdfs://namenode/x", "hdfs:// sources are not supported by the node cache; copy the model"),
        ("webhdfs://namenode/x", "webhdfs:// sources are not supported"),
        ("oci://registry/img:tag", "modelcars are pulled and cached by the container runtime"),
        ("modelscope://org/m", "use the model's Hugging Face mirror"),
        ("pvc://claim/x", "mount it in the predictor without a cache"),
        ("ftp://host/x", "scheme 'ftp' is not supported"),
        ("gs://B/x", "not a valid GCS bucket"),
        ("gs://key@bkt/x", "carry no credentials"),
        ("gs://bkt/../x", "'..'"),
        ("https://acct.blob.core.windows.net/Bad_Container/x", "not a valid Azure container name"),
        ("https://acct.blob.core.windows.net/c12/../x", "must not contain '..'"),
        ("https://acct.file.core.windows.net/share/x", "Azure Files shares are not supported"),
        ("https://github.com/org/model.git", "git repositories are not supported"),
        ("abfss://acct.dfs.core.windows.net/x", "abfss://FILESYSTEM@ACCOUNT.dfs.core.windows.net/PATH"),
        ("meta-llama/Llama", "has no scheme"),
        ("hf://just-a-name", "hf://OWNER/REPO"),
        ("hf://a/b/c", "hf://OWNER/REPO"),
        ("hf://a/../b", "hf://OWNER/REPO"),
        ("hf://a/b:", "not a valid git ref"),
        ("hf://a/b:x y", "not a valid git ref"),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket"),
        ("s3://bucket/../x", "'..'"),
        ("https://", "need a host"),
        ("https://host/", "names no file"),
        ("https://host:99999/x.bin", "Port out of range"),
        ("file://relative/path", "absolute path"),
        ("/a/../etc", "without '..'"),
        ("", "expected a URI"),
        (" hf://a/b", "whitespace"),
    ],
)
def test_rejects_with_reason(uri: str, message: str) -> None:
    with pytest.raises(URIError, match="sourceModelUri") as info:
        parse_uri(uri)
    assert message in str(info.value)


def test_redaction_hides_query_and_userinfo() -> None:
    uri = parse_uri("https://user:pa55@host/m.tar.gz?X-Amz-Signature=TOPSECRET")
    assert "TOPSECRET" not in uri.redacted() and "pa55" not in uri.redacted()
    assert "TOPSECRET" not in str(uri)
    assert uri.archive_suffix == ".tar.gz"
    with pytest.raises(URIError) as info:
        parse_uri("https://host/?sig=TOPSECRET")
    assert "TOPSECRET" not in str(info.value)


def test_revision_override() -> None:
    assert parse_uri("hf://a/b:main").with_revision("v2").revision == "v2"
    with pytest.raises(URIError, match="hf://"):
        parse_uri("s3://bucket/x").with_revision("v2")


def test_storage_key_matches_kserve() -> None:
    # KServe's GetStorageKey: hex(sha256(uri))[:16]; the constant comes from `sha256sum`.
    assert storage_key("hf://meta-llama/meta-llama-3-8b-instruct") == "c277d78a31bc6624"
    assert storage_key("hf://meta-llama/meta-llama-3-8b-instruct:main") != "c277d78a31bc6624"


def test_layout_paths_refuse_non_keys(tmp_path: Path) -> None:
    layout = CacheLayout(tmp_path)
    key = storage_key("hf://a/b")
    assert layout.model_dir(key) == tmp_path / "models" / key
    assert layout.manifest_file(key).parent == tmp_path / ".modelcache" / "manifests"
    assert CacheLayout.of_model_dir(layout.model_dir(key)) == (layout, key)
    assert CacheLayout.of_model_dir(tmp_path / "elsewhere") is None
    for bad in ("../../etc", "ABCDEF0123456789", "abc"):
        with pytest.raises(ValueError, match="storage key"):
            layout.model_dir(bad)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("hf://org/m:main", "hf://org/m:main"),
        ("s3://bkt/models/llama?versionId=3HL4kqtJlcpXroDTDmJ", "s3://bkt/models/llama?<redacted>"),
        ("s3://AKIAKEY:SECRET@bkt/m", "s3://bkt/m"),
        ("gs://bkt/m?GoogleAccessId=x&Signature=SECRET", "gs://bkt/m?<redacted>"),
        (
            "https://acct.blob.core.windows.net/models/llama?sv=2024&sig=SECRET",
            "https://acct.blob.core.windows.net/models/llama?<redacted>",
        ),
        ("abfss://models@acct.dfs.core.windows.net/llama", "abfss://models@acct.dfs.core.windows.net/llama"),
        ("abfss://u:SECRET@acct.dfs.core.windows.net/llama", "abfss://acct.dfs.core.windows.net/llama"),
        ("http://user:pa55@host:8080/m.tar.gz?sig=SECRET#frag", "http://host:8080/m.tar.gz?<redacted>"),
        ("https://host/m.zip?X-Amz-Signature=SECRET", "https://host/m.zip?<redacted>"),
        ("HTTPS://u@Host/m.zip", "https://Host/m.zip"),
        ("file:///models/m?token=SECRET", "file:///models/m?<redacted>"),
        ("file:///models/m", "file:///models/m"),
        ("/models/m", "/models/m"),
        ("s3://bkt/a\nINFO forged", "s3://bkt/a\\nINFO forged"),
        ("/models/\u202egnp.exe", "/models/\\u202egnp.exe"),
    ],
)
def test_one_redaction_rule_for_every_scheme(text: str, shown: str) -> None:
    from localmodel.uri import redact

    assert redact(text) == shown
    try:
        parsed = parse_uri(text)
    except URIError as e:  # gs://, control characters: the message shows the same redaction
        assert "SECRET" not in str(e) and "pa55" not in str(e) and "\n" not in str(e)
    else:
        assert parsed.redacted() == shown and str(parsed) == shown


@pytest.mark.parametrize(
    "uri", ["file:///models/a%0Ab", "s3://bkt/a\x1bb", "hf://org/m\u2028", "https://host/a\u202eb.bin"]
)
def test_control_characters_refused_in_uris(uri: str) -> None:
    with pytest.raises(URIError, match="control characters") as info:
        parse_uri(uri)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value) and "\u202e" not in str(info.value)
