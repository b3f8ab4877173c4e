"""The site: grid connection, prices, congestion windows, forecasts, configuration."""
