-- TEMPORARY naive Fernet (to be replaced by the optimised one)
CREATE FUNCTION owui_crypto.fernet_seal(key bytea, message bytea, iv bytea DEFAULT NULL, issued_at bigint DEFAULT NULL) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE body bytea; v_iv bytea := coalesce(iv, owui_crypto.gen_random_bytes(16));
BEGIN
  body := '\x80'::bytea || pg_catalog.int8send(coalesce(issued_at, extract(epoch from now())::bigint)) || v_iv || owui_crypto.encrypt_iv(message, substr(key,17,16), v_iv, 'aes-cbc/pad:pkcs');
  RETURN replace(replace(replace(encode(body || owui_crypto.hmac(body, substr(key,1,16), 'sha256'), 'base64'), E'\n',''),'+','-'),'/','_');
END $$;
CREATE FUNCTION owui_crypto.fernet_open(key bytea, token text, ttl_seconds bigint DEFAULT NULL, now_epoch bigint DEFAULT NULL) RETURNS bytea
LANGUAGE plpgsql STABLE AS $$
DECLARE raw bytea; n int;
BEGIN
  raw := decode(replace(replace(token,'-','+'),'_','/'), 'base64'); n := length(raw);
  IF substr(raw, n-31, 32) <> owui_crypto.hmac(substr(raw,1,n-32), substr(key,1,16), 'sha256') THEN RAISE EXCEPTION 'sealed value failed its integrity check' USING ERRCODE='OC003'; END IF;
  RETURN owui_crypto.decrypt_iv(substr(raw, 26, n-57), substr(key,17,16), substr(raw,10,16), 'aes-cbc/pad:pkcs');
END $$;
