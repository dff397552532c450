"""Real aiohttp servers on loopback that stand in for the providers in tests."""
