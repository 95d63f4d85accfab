"""KServe's own models as a validator, in a process of its own: KServe's gRPC protos and
tritonclient's declare the same protobuf symbols and cannot be imported into one process.

    python tests/kserve_check.py TYPE < document.json   ->  a JSON list of errors ([] when valid)
"""

import json
import re
import sys

import kserve
import kubernetes.client

_LIST = re.compile(r"^[Ll]ist\[(.+)\]$")  # KServe's generator writes list[X] and dict(str, X), the
_DICT = re.compile(r"^(?:dict\((.+), (.+)\)|Dict\[(.+), (.+)\])$")  # Kubernetes client's List[X] and Dict[str, X]


def check_against_models(data, type_name: str, where: str = "") -> list[str]:
    """Every key of `data` known to KServe's (or the Kubernetes client's) generated model of that
    type, recursively, with values of the declared kinds; the errors found."""
    if match := _LIST.match(type_name):
        if not isinstance(data, list):
            return [f"{where}: expected a list, got {type(data).__name__}"]
        return [e for i, item in enumerate(data) for e in check_against_models(item, match.group(1), f"{where}[{i}]")]
    if match := _DICT.match(type_name):
        if not isinstance(data, dict):
            return [f"{where}: expected a map, got {type(data).__name__}"]
        value_type = match.group(2) or match.group(4)
        return [e for k, v in data.items() for e in check_against_models(v, value_type, f"{where}.{k}")]
    primitives = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str}
    if type_name in primitives:
        ok = isinstance(data, primitives[type_name]) and not (type_name == "int" and isinstance(data, bool))
        return [] if ok else [f"{where}: expected {type_name}, got {data!r}"]
    model = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name)
    if not isinstance(data, dict):
        return [f"{where}: expected a {type_name} table, got {data!r}"]
    json_to_attr = {json_key: attr for attr, json_key in model.attribute_map.items()}
    errors = [f"{where}.{key}: not a field of {type_name}" for key in data if key not in json_to_attr]
    for key, value in data.items():
        if key in json_to_attr:
            errors += check_against_models(value, model.openapi_types[json_to_attr[key]], f"{where}.{key}")
    return errors




if __name__ == "__main__":
    print(json.dumps(check_against_models(json.load(sys.stdin), sys.argv[1])))
