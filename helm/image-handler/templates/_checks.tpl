{{/*
Rules across several values, which values.schema.json cannot state: each fails the install with
a message that says what to change. configmap.yaml includes this, so every render runs it.
*/}}
{{- define "image-handler.checks" -}}
{{- $h := .Values.handler -}}
{{- if and (gt (int $h.replicaCount) 1) (ne $h.storage.backend "postgres") -}}
{{- fail (printf "handler.replicaCount is %d, but the embedded queue (a journal on the handler's own volume) runs ONE replica: more replicas would each keep a separate queue. Scale scanning with scanner.replicaCount and scanner.slots, result processing with handler.resultWorkers; more handler replicas need the shared (PostgreSQL) backend." (int $h.replicaCount)) -}}
{{- end -}}
{{- if and (eq $h.storage.backend "postgres") (not $h.storage.database.urlSecret) -}}
{{- fail "handler.storage.backend postgres needs handler.storage.database.urlSecret: the name of a Secret whose key (handler.storage.database.urlSecretKey, default url) holds the database URL, e.g. postgresql://USER:PASSWORD@HOST:5432/DB." -}}
{{- end -}}
{{- if le (float64 $h.timeouts.heartbeatTimeout) (float64 $h.timeouts.heartbeatInterval) -}}
{{- fail (printf "handler.timeouts.heartbeatTimeout (%v s) must exceed handler.timeouts.heartbeatInterval (%v s): a scanner would be declared gone between two heartbeats." $h.timeouts.heartbeatTimeout $h.timeouts.heartbeatInterval) -}}
{{- end -}}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int $h.grpcPort)) -}}
{{- fail (printf "metrics.port and handler.grpcPort are both %d: give the metrics their own port." (int $h.grpcPort)) -}}
{{- end -}}
{{- if and $h.healthPort (or (eq (int $h.healthPort) (int $h.grpcPort)) (and .Values.metrics.enabled (eq (int $h.healthPort) (int .Values.metrics.port)))) -}}
{{- fail (printf "handler.healthPort %d is taken by the gRPC or metrics port: give the health service its own port (or 0 to probe the gRPC port)." (int $h.healthPort)) -}}
{{- end -}}
{{- if and $h.tls.certSecret $h.extraConfig.tls_cert -}}
{{- fail "handler.tls.certSecret and handler.extraConfig.tls_cert both set the handler's certificate: keep one (handler.tls.certSecret mounts the Secret for you)." -}}
{{- end -}}
{{- if and $h.tls.certSecret (not $h.healthPort) -}}
{{- fail "handler.tls.certSecret puts TLS on the gRPC port, which Kubernetes' gRPC probes cannot speak: set handler.healthPort (for example 50052) for a plaintext health-only port." -}}
{{- end -}}
{{- if and $h.tls.clientCASecret (not $h.tls.certSecret) (not $h.extraConfig.tls_cert) -}}
{{- fail "handler.tls.clientCASecret (mutual TLS) needs the handler's own certificate: set handler.tls.certSecret." -}}
{{- end -}}
{{- if and $h.tls.clientCASecret .Values.scanner.enabled -}}
{{- fail "handler.tls.clientCASecret (mutual TLS) with the chart's scanners: each scanner's certificate must name its own scanner id, which one Deployment's Secret cannot. Give the scanners a token instead (handler.tokens.secret, scanner.token.secret), or set scanner.enabled=false and run scanners with their own certificates." -}}
{{- end -}}
{{- if and $h.tokens.secret .Values.scanner.enabled (not .Values.scanner.token.secret) (not (hasKey .Values.secrets.scannerEnv "IMAGE_SCANNER_TOKEN")) -}}
{{- fail "handler.tokens.secret makes every call need a token, and the chart's scanners have none: set scanner.token.secret (and key) to a Secret holding a token with the scanner role." -}}
{{- end -}}
{{- if and .Values.jobPolicy.credentialsSecret (not .Values.jobPolicy.credentialGrants) -}}
{{- fail "jobPolicy.credentialsSecret gives the scanners pull credentials, but jobPolicy.credentialGrants grants none of them: the handler would refuse every credentials_ref, and the scanners would not start with an ungranted credential. Grant each credentials_ref its registries and allowed callers in jobPolicy.credentialGrants." -}}
{{- end -}}
{{- $s := .Values.scanner -}}
{{- if and $s.enabled $s.autoscaling.enabled (gt (int $s.autoscaling.minReplicas) (int $s.autoscaling.maxReplicas)) -}}
{{- fail (printf "scanner.autoscaling.minReplicas (%d) is above scanner.autoscaling.maxReplicas (%d)." (int $s.autoscaling.minReplicas) (int $s.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if lt (float64 $s.backoff.max) (float64 $s.backoff.initial) -}}
{{- fail (printf "scanner.backoff.max (%v s) is below scanner.backoff.initial (%v s)." $s.backoff.max $s.backoff.initial) -}}
{{- end -}}
{{- end -}}
