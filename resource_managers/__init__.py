"""S2 resource managers: each device family speaks its own protocol and S2 to the CEM."""
