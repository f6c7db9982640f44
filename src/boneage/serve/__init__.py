"""``boneage serve``: a FastAPI web service (REST API under ``/api/v1``) and a browser page at ``/``.

The app is built by ``boneage.serve.app.create_app``; ``boneage.serve.server.run_server`` runs it with uvicorn. This
package imports FastAPI only when ``boneage.serve.app`` is imported (``pip install 'boneage[app]'``).
"""
