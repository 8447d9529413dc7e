"""The browser pages: server-rendered Jinja2 with htmx, under a strict CSP.

- `views`: the routes, login and logout, and the forms' writes (each through the operator API).
- `sessions`: login sessions with CSRF tokens.
- `pagedata`: what each page shows, gathered from the store, the signals and the traces.
- `charts`: the geometry of the SVG charts, graph and waterfalls (numbers in, numbers out).
- `templates/`: the pages; every value is escaped.
"""
