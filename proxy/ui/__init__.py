"""The status page (``GET /ui``): the page and its assets, its login, and its JSON.

- ``sessions``: one-time login tokens (minted through the local API with the API key) and the
  browser sessions they open.
- ``page``: the handlers (``/ui``, ``/ui/login``, ``/ui/<asset>``, ``/api/stats``,
  ``/api/ui/login-tokens``) and the headers that keep a browser from misusing them.
- ``command``: ``atlasburn-proxy ui``, which asks the daemon for a login URL and prints it.
- ``static/``: the page (HTML, CSS, JS with hand-written SVG charts): no build step, nothing
  fetched from another host.
"""
