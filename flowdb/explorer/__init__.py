"""The flow explorer: `flowdb serve`, a local web app over the same graph (app.py), the
data it reads in bounded pieces (data.py), and who may use it (security.py)."""
