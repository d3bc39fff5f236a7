# Open WebUI with owui-crypto: the official image, plus this project, started by `owui-crypto serve`.
# Documentation as much as a build file (see README.md, "Container"):
#
#   docker build -t owui-crypto:0.12.4 .
#   docker run -p 8080:8080 \
#     -e DATABASE_URL=postgresql+psycopg://owui:...@db.example:5432/openwebui \
#     -e WEBUI_SECRET_KEY=... \
#     -e AWS_REGION=eu-central-1 -e KMS_HMAC_KEY_ID=alias/owui-user-ids -e KMS_APPLICATION_CMK_ID=alias/owui-deks \
#     owui-crypto:0.12.4
#
# On ECS the task role gives KMS access (GenerateMac on the HMAC key; GenerateDataKey, Encrypt, Decrypt on the
# CMK); WEBUI_SECRET_KEY and the database password come from Secrets Manager.
FROM ghcr.io/open-webui/open-webui:v0.12.4

COPY pyproject.toml README.md alembic.ini /opt/owui-crypto/
COPY app_adapter /opt/owui-crypto/app_adapter
COPY alembic /opt/owui-crypto/alembic
COPY sql /opt/owui-crypto/sql
# A regular (non-editable) install: the SQL and the Alembic project land in /usr/local/share/owui-crypto.
RUN pip install --no-cache-dir /opt/owui-crypto && rm -rf /opt/owui-crypto

# The image runs Open WebUI from source in /app/backend; the owui-crypto command must be able to import it.
ENV PYTHONPATH=/app/backend
WORKDIR /app/backend
EXPOSE 8080
# Replaces the image's start.sh: owui-crypto runs Open WebUI's migrations, then its own, then serves
# open_webui.main:app with the hooks in place. One uvicorn worker per container (scale with tasks).
ENTRYPOINT ["owui-crypto", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
