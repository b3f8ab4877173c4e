"""OCPP 1.6J / 2.0.1 central system that represents each EVSE as an S2 resource manager."""
