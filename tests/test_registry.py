import pytest

from kdzoo.errors import ConfigError
from kdzoo.registry import Registry


def test_register_records_defaults_and_meta():
    registry = Registry("widget")

    @registry.register("box", paper="Someone 2020")
    class Box:
        def __init__(self, size: int = 3, colour: str = "red"):
            self.size, self.colour = size, colour

    entry = registry.get("box")
    assert entry.defaults == {"size": 3, "colour": "red"}
    assert entry.paper == "Someone 2020"
    assert registry.build("box", size=5).size == 5
    assert "box" in registry and registry.names() == ["box"]


def test_unknown_name_and_option_give_one_line_hints():
    registry = Registry("widget")
    registry.register("kd")(lambda temperature=4.0: temperature)
    with pytest.raises(ConfigError, match="unknown widget 'kdd'; did you mean kd"):
        registry.get("kdd")
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        registry.build("kd", temprature=2)


def test_double_registration_is_refused():
    registry = Registry("widget")
    registry.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(lambda: 2)
