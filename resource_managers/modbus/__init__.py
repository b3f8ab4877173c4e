"""Modbus TCP resource managers driven by register maps: battery, heat pump, PV, meter."""
