"""The parsers never raise anything but the project's own errors, whatever they are fed."""

import contextlib
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localmodel.documents import parse_text
from localmodel.errors import InvalidInput, QuantityError, SpecError, URIError
from localmodel.quantity import Quantity
from localmodel.resources import LocalModelCache, LocalModelNode, LocalModelNodeGroup
from localmodel.uri import parse_uri

QUANTITY_ALPHABET = string.digits + ".+-eEinumkKMGTP " + "x"
fast = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(st.one_of(st.text(QUANTITY_ALPHABET, max_size=24), st.text(max_size=24)))
def test_quantity_raises_only_quantity_error(text: str) -> None:
    try:
        q = Quantity.parse(text)
    except QuantityError:
        return
    assert Quantity.parse(str(q)) == q  # whatever parses, its canonical form parses to the same


@fast
@given(
    st.one_of(
        st.text(max_size=60),
        st.builds(
            lambda scheme, rest: f"{scheme}://{rest}",
            st.sampled_from(["hf", "s3", "http", "https", "file", "gs", "HF", ""]),
            st.text(string.printable, max_size=60),
        ),
    )
)
def test_uri_raises_only_uri_error(text: str) -> None:
    try:
        uri = parse_uri(text)
    except URIError:
        return
    assert uri.raw == text
    uri.redacted()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@fast
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "metadata": st.one_of(json_values, st.fixed_dictionaries({"name": st.text(max_size=5)})),
            "spec": st.one_of(
                json_values,
                st.fixed_dictionaries(
                    {},
                    optional={
                        "sourceModelUri": json_values,
                        "modelSize": json_values,
                        "nodeGroups": json_values,
                        "nodeGroup": json_values,
                        "storageLimit": json_values,
                        "persistentVolumeSpec": json_values,
                        "localModels": json_values,
                    },
                ),
            ),
            "status": json_values,
        },
    )
)
def test_resource_parsers_raise_only_spec_error(doc: dict[str, object]) -> None:
    for cls in (LocalModelCache, LocalModelNodeGroup, LocalModelNode):
        with contextlib.suppress(SpecError):
            cls.from_json(doc)


@fast
@given(st.text(max_size=200))
def test_yaml_documents_raise_only_spec_error(text: str) -> None:
    try:
        parse_text(text, where="fuzz.yaml")
    except InvalidInput as e:
        assert "\n" not in str(e)


@fast
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "apiVersion": st.sampled_from(["serving.kserve.io/v1alpha1", "v1", "x"]),
                "kind": st.sampled_from(
                    ["LocalModelCache", "LocalModelNodeGroup", "LocalModelNode", "Node", "List"]
                ),
            },
            optional={
                "metadata": st.one_of(json_values, st.fixed_dictionaries({"name": st.text(max_size=5)})),
                "spec": json_values,
                "items": json_values,
            },
        ),
        max_size=3,
    )
)
def test_structured_yaml_raises_only_project_errors(docs: list[dict[str, object]]) -> None:
    import yaml

    text = yaml.safe_dump_all(docs)
    try:
        parse_text(text, where="fuzz.yaml")
    except InvalidInput as e:
        assert "\n" not in str(e)
