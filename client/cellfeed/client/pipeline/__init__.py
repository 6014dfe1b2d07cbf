"""The client's stream pipeline.

`endpoints` asks GetFlightInfo for the streams' tickets and replica locations (the client builds
no ticket itself).
"""
